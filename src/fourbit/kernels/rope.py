"""Rotary position embedding for q and k straight from one grouped q/k/v projection, one Triton kernel each way.

Why: transformers splits the fused projection into q, k, v views, and apply_rotary_pos_emb runs
~5 elementwise kernels per tensor (two products, a neg, a cat, an add), each a bf16 round trip;
autograd keeps q, k and rotate_half's copies alive for backward. Here one program per token reads
the whole qkv row once, writes rotated q, k and a copy of v, and keeps only cos and sin for backward.

Layout: qkv (B, T, (H + 2 Hkv) D) = [q heads (H D) | k heads (Hkv D) | v heads (Hkv D)], each head D
contiguous values; cos, sin (B or 1, T, D) as LlamaRotaryEmbedding returns them.

Math (per head, x = [x1 | x2], halves of D/2; cos, sin = [c1 | c2], [s1 | s2]; fp32 inside, one rounding):
    y = x * cos + rotate_half(x) * sin,  rotate_half(x) = [-x2 | x1]
    y1 = x1 c1 - x2 s1
    y2 = x2 c2 + x1 s2                          (c1 == c2 is not assumed)
  backward, dy = [dy1 | dy2]:
    dx1 = dy1 c1 + dy2 s2
    dx2 = dy2 c2 - dy1 s1
  v is copied both ways; cos and sin get no gradient.
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_qkv_reference(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_heads: int, n_kv_heads: int,
                       head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """transformers' apply_rotary_pos_emb on the split projection, in fp32 and rounded once (autograd gives
    the backward). Returns q (B, T, H, D), k and v (B, T, Hkv, D), contiguous, in qkv's dtype."""
    B, T, _ = qkv.shape
    q, k, v = qkv.view(B, T, n_heads + 2 * n_kv_heads, head_dim).split([n_heads, n_kv_heads, n_kv_heads], dim=2)
    c = cos.float().unsqueeze(-2)                                   # (B|1, T, 1, D)
    s = sin.float().unsqueeze(-2)

    def rot(x):
        xf = x.float()
        return (xf * c + _rotate_half(xf) * s).to(qkv.dtype).contiguous()

    return rot(q), rot(k), v.contiguous()


if triton is not None:

    @triton.jit
    def _cos_sin(cos_ptr, sin_ptr, b, t, d, dm, HALF, cs_b, cs_t, cs_d, ss_b, ss_t, ss_d):
        # one token's cos and sin, first and second half, fp32
        c1 = tl.load(cos_ptr + b * cs_b + t * cs_t + d * cs_d, mask=dm, other=0.0).to(tl.float32)
        c2 = tl.load(cos_ptr + b * cs_b + t * cs_t + (d + HALF) * cs_d, mask=dm, other=0.0).to(tl.float32)
        s1 = tl.load(sin_ptr + b * ss_b + t * ss_t + d * ss_d, mask=dm, other=0.0).to(tl.float32)
        s2 = tl.load(sin_ptr + b * ss_b + t * ss_t + (d + HALF) * ss_d, mask=dm, other=0.0).to(tl.float32)
        return c1, c2, s1, s2

    @triton.jit
    def _rotate_heads(src, dst, hh, d, m, D, HALF, c1, c2, s1, s2):
        # a block of heads (rows hh) of one token: [x1 | x2] -> [x1 c1 - x2 s1 | x2 c2 + x1 s2]
        x1 = tl.load(src + hh * D + d, mask=m, other=0.0).to(tl.float32)
        x2 = tl.load(src + hh * D + HALF + d, mask=m, other=0.0).to(tl.float32)
        out = dst + hh * D + d
        tl.store(out, (x1 * c1 - x2 * s1).to(dst.dtype.element_ty), mask=m)
        tl.store(out + HALF, (x2 * c2 + x1 * s2).to(dst.dtype.element_ty), mask=m)

    @triton.jit
    def _unrotate_heads(g_ptr, g_b, g_t, g_h, g_d, dst, b, t, hh, d, m, D, HALF, c1, c2, s1, s2,
                        HAS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
        # the gradient through `_rotate_heads` (the transposed rotation) for a block of heads; zeros
        # when that output had no gradient
        if HAS:
            g = g_ptr + b * g_b + t * g_t + hh * g_h
            y1 = tl.load(g + d * g_d, mask=m, other=0.0).to(tl.float32)
            y2 = tl.load(g + (d + HALF) * g_d, mask=m, other=0.0).to(tl.float32)
            x1 = y1 * c1 + y2 * s2
            x2 = y2 * c2 - y1 * s1
        else:
            x1 = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
            x2 = x1
        tl.store(dst + hh * D + d, x1.to(dst.dtype.element_ty), mask=m)
        tl.store(dst + hh * D + HALF + d, x2.to(dst.dtype.element_ty), mask=m)

    @triton.jit
    def _rope_fwd(qkv_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, v_ptr, T, H, HKV, D, HALF,
                  cs_b, cs_t, cs_d, ss_b, ss_t, ss_d,
                  BLOCK_H: tl.constexpr, BLOCK_KV: tl.constexpr, BLOCK_D: tl.constexpr):
        # one token row: all q heads (BLOCK_H, BLOCK_D) per half, then k heads, then the v copy
        row = tl.program_id(0).to(tl.int64)
        b = row // T
        t = row - b * T
        d = tl.arange(0, BLOCK_D)[None, :]                                   # (1, BLOCK_D) within a half
        dm = d < HALF
        c1, c2, s1, s2 = _cos_sin(cos_ptr, sin_ptr, b, t, d, dm, HALF, cs_b, cs_t, cs_d, ss_b, ss_t, ss_d)
        src = qkv_ptr + row * ((H + 2 * HKV) * D)

        hq = tl.arange(0, BLOCK_H)[:, None]                                  # (BLOCK_H, 1)
        _rotate_heads(src, q_ptr + row * (H * D), hq, d, (hq < H) & dm, D, HALF, c1, c2, s1, s2)
        hk = tl.arange(0, BLOCK_KV)[:, None]                                 # (BLOCK_KV, 1)
        m = (hk < HKV) & dm
        _rotate_heads(src + H * D, k_ptr + row * (HKV * D), hk, d, m, D, HALF, c1, c2, s1, s2)

        vsrc = src + (H + HKV) * D + hk * D + d
        dst = v_ptr + row * (HKV * D) + hk * D + d
        tl.store(dst, tl.load(vsrc, mask=m), mask=m)
        tl.store(dst + HALF, tl.load(vsrc + HALF, mask=m), mask=m)

    @triton.jit
    def _rope_bwd(dq_ptr, dk_ptr, dv_ptr, cos_ptr, sin_ptr, dqkv_ptr, T, H, HKV, D, HALF,
                  cs_b, cs_t, cs_d, ss_b, ss_t, ss_d,
                  dq_b, dq_t, dq_h, dq_d, dk_b, dk_t, dk_h, dk_d, dv_b, dv_t, dv_h, dv_d,
                  HAS_DQ: tl.constexpr, HAS_DK: tl.constexpr, HAS_DV: tl.constexpr,
                  BLOCK_H: tl.constexpr, BLOCK_KV: tl.constexpr, BLOCK_D: tl.constexpr):
        # one token row of dqkv; dq, dk, dv read through their strides; a missing one writes zeros
        row = tl.program_id(0).to(tl.int64)
        b = row // T
        t = row - b * T
        d = tl.arange(0, BLOCK_D)[None, :]                                   # (1, BLOCK_D)
        dm = d < HALF
        c1, c2, s1, s2 = _cos_sin(cos_ptr, sin_ptr, b, t, d, dm, HALF, cs_b, cs_t, cs_d, ss_b, ss_t, ss_d)
        dst = dqkv_ptr + row * ((H + 2 * HKV) * D)
        out_ty = dqkv_ptr.dtype.element_ty

        hq = tl.arange(0, BLOCK_H)[:, None]                                  # (BLOCK_H, 1)
        _unrotate_heads(dq_ptr, dq_b, dq_t, dq_h, dq_d, dst, b, t, hq, d, (hq < H) & dm, D, HALF,
                        c1, c2, s1, s2, HAS_DQ, BLOCK_H, BLOCK_D)
        hk = tl.arange(0, BLOCK_KV)[:, None]                                 # (BLOCK_KV, 1)
        m = (hk < HKV) & dm
        _unrotate_heads(dk_ptr, dk_b, dk_t, dk_h, dk_d, dst + H * D, b, t, hk, d, m, D, HALF,
                        c1, c2, s1, s2, HAS_DK, BLOCK_KV, BLOCK_D)

        if HAS_DV:
            g = dv_ptr + b * dv_b + t * dv_t + hk * dv_h
            v1 = tl.load(g + d * dv_d, mask=m, other=0.0).to(out_ty)
            v2 = tl.load(g + (d + HALF) * dv_d, mask=m, other=0.0).to(out_ty)
        else:
            v1 = tl.zeros((BLOCK_KV, BLOCK_D), dtype=out_ty)
            v2 = v1
        tl.store(dst + (H + HKV) * D + hk * D + d, v1, mask=m)
        tl.store(dst + (H + HKV) * D + hk * D + HALF + d, v2, mask=m)


from . import interpreting as _interpreting   # noqa: E402  (shared by the kernels)


# Decided once at import, as in nf4: the kernel object tells which mode it is in.
_INTERPRET = triton is not None and _interpreting(_rope_fwd)


def _blocks(H: int, Hkv: int, D: int) -> dict:
    return dict(BLOCK_H=triton.next_power_of_2(H), BLOCK_KV=triton.next_power_of_2(Hkv),
                BLOCK_D=triton.next_power_of_2(D // 2), num_warps=4, enable_fp_fusion=False)


class RoPEQKVFunction(torch.autograd.Function):
    """q, k rotated and v copied out of one qkv projection; saves only cos and sin, returns d(qkv) as one
    tensor (the grouped projection's output gradient). No FMA: the fp32 math matches the reference's."""

    @staticmethod
    def forward(ctx, qkv, cos, sin, H: int, Hkv: int, D: int):
        qkv = qkv.contiguous()
        B, T, _ = qkv.shape
        cos, sin = cos.expand(B, T, D), sin.expand(B, T, D)        # broadcast batch -> stride 0
        q = torch.empty(B, T, H, D, dtype=qkv.dtype, device=qkv.device)
        k = torch.empty(B, T, Hkv, D, dtype=qkv.dtype, device=qkv.device)
        v = torch.empty_like(k)
        _rope_fwd[(B * T,)](qkv, cos, sin, q, k, v, T, H, Hkv, D, D // 2, *cos.stride(), *sin.stride(),
                            **_blocks(H, Hkv, D))
        ctx.save_for_backward(cos, sin)
        ctx.meta = (qkv.shape, qkv.dtype, H, Hkv, D)
        ctx.set_materialize_grads(False)
        return q, k, v

    @staticmethod
    def backward(ctx, dq, dk, dv):
        cos, sin = ctx.saved_tensors
        shape, dtype, H, Hkv, D = ctx.meta
        B, T, _ = shape
        dqkv = torch.empty(shape, dtype=dtype, device=cos.device)
        grads = [(g, g.stride()) if g is not None else (dqkv, (0, 0, 0, 0)) for g in (dq, dk, dv)]
        _rope_bwd[(B * T,)](*(g for g, _ in grads), cos, sin, dqkv, T, H, Hkv, D, D // 2,
                            *cos.stride(), *sin.stride(), *(s for _, st in grads for s in st),
                            HAS_DQ=dq is not None, HAS_DK=dk is not None, HAS_DV=dv is not None,
                            **_blocks(H, Hkv, D))
        return dqkv, None, None, None, None, None


def rope_qkv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_heads: int, n_kv_heads: int,
             head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rotary embedding on one grouped projection: the Triton kernels on CUDA (or under the interpreter),
    the reference elsewhere.

    Args:
        qkv: (B, T, (H + 2 Hkv) D) = [q heads | k heads | v heads], bf16 / fp16 / fp32.
        cos, sin: (B or 1, T, D), any float dtype and strides (LlamaRotaryEmbedding's output).
        n_heads, n_kv_heads, head_dim: H, Hkv, D (D even).
    Returns:
        q (B, T, H, D), k (B, T, Hkv, D), v (B, T, Hkv, D): new contiguous tensors in qkv's dtype, q and k
        rotated, v copied; differentiable w.r.t. qkv (one autograd node).
    """
    if head_dim % 2:
        raise ValueError(f"head_dim must be even (rotate_half), got {head_dim}")
    if qkv.dim() != 3 or qkv.shape[-1] != (n_heads + 2 * n_kv_heads) * head_dim:
        raise ValueError(f"qkv must be (B, T, (H + 2 Hkv) D) = (B, T, {(n_heads + 2 * n_kv_heads) * head_dim}), "
                         f"got {tuple(qkv.shape)}")
    if triton is not None and (qkv.is_cuda or (_INTERPRET and qkv.device.type == "cpu")):
        return RoPEQKVFunction.apply(qkv, cos, sin, n_heads, n_kv_heads, head_dim)
    return rope_qkv_reference(qkv, cos, sin, n_heads, n_kv_heads, head_dim)

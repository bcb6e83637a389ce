"""Fused q/k/v rotary embedding: Triton kernel == torch reference, reference == transformers' apply_rotary_pos_emb.

As in test_kernels_fused: the interpreter is chosen when a kernel is decorated, so without a GPU the
kernel tests re-run themselves in a fresh process with TRITON_INTERPRET=1. The interpreter's
fp32 -> bf16 cast truncates instead of rounding to nearest, so bf16 results there may be 1 ulp off
the reference (fp32 results are bit-identical: no FMA, same operation order).
"""

import pytest
import torch

triton = pytest.importorskip("triton")

from fourbit.kernels.rope import rope_qkv, rope_qkv_reference  # noqa: E402
from _triton_rerun import in_interpreter_or_rerun  # noqa: E402

ON_GPU = torch.cuda.is_available()
DEV = "cuda" if ON_GPU else "cpu"
# (B, T, H, Hkv, D, cos batch): SmolLM2-135M's odd head counts, D=128 with broadcast cos
SHAPES = ((2, 5, 9, 3, 64, 2), (1, 3, 4, 2, 128, 1), (2, 3, 4, 2, 128, 1))


def _in_interpreter_or_rerun(request):
    return in_interpreter_or_rerun(request, __file__)


def _ulps(a, b):
    """Largest distance in units of last place between two same-dtype tensors (0 for fp32 equality)."""
    if a.dtype == torch.float32:
        return 0 if torch.equal(a, b) else float((a - b).abs().max())
    ia, ib = a.view(torch.int16).int(), b.view(torch.int16).int()
    ka = torch.where(ia < 0, -(ia & 0x7FFF), ia)      # bit pattern -> monotone integer
    kb = torch.where(ib < 0, -(ib & 0x7FFF), ib)
    return int((ka - kb).abs().max())


def _problem(B, T, H, Hkv, D, cb, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    qkv = (torch.randn(B, T, (H + 2 * Hkv) * D, generator=g) * 2).to(DEV, dtype)
    # cos/sin: fp32, non-contiguous (a transposed buffer), halves unequal on purpose
    cos = torch.randn(cb, D, T, generator=g).to(DEV).transpose(1, 2)
    sin = torch.randn(cb, D, T, generator=g).to(DEV).transpose(1, 2)
    return qkv, cos, sin


def _grads(B, T, H, Hkv, D, dtype, seed=1):
    """dq, dk, dv as SDPA hands them back: (B, T, h, D) views of (B, h, T, D) tensors."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, h, T, D, generator=g).to(DEV, dtype).transpose(1, 2) for h in (H, Hkv, Hkv)]


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_forward_matches_reference(dtype, request):
    if _in_interpreter_or_rerun(request):
        return
    max_ulps = 0 if dtype == torch.float32 else 1
    for B, T, H, Hkv, D, cb in SHAPES:
        qkv, cos, sin = _problem(B, T, H, Hkv, D, cb, dtype)
        for c, s in ((cos, sin), (cos.to(dtype), sin.to(dtype))):
            out = rope_qkv(qkv.clone().requires_grad_(True), c, s, H, Hkv, D)
            assert all(type(o.grad_fn).__name__ == "RoPEQKVFunctionBackward" for o in out)   # the kernel ran
            out = [o.detach() for o in out]
            ref = rope_qkv_reference(qkv, c, s, H, Hkv, D)
            for o, r, h in zip(out, ref, (H, Hkv, Hkv)):
                assert o.shape == (B, T, h, D) and o.dtype == dtype and o.is_contiguous()
                assert _ulps(o, r) <= max_ulps, (B, T, H, Hkv, D, cb)
            assert torch.equal(out[2], qkv[..., (H + Hkv) * D:].view(B, T, Hkv, D))


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_backward_matches_reference(dtype, request):
    """Non-contiguous dq, dk, dv; then only q used (dk, dv arrive as None and give zeros)."""
    if _in_interpreter_or_rerun(request):
        return
    from fourbit.kernels.rope import RoPEQKVFunction
    max_ulps = 0 if dtype == torch.float32 else 1
    for B, T, H, Hkv, D, cb in SHAPES:
        qkv, cos, sin = _problem(B, T, H, Hkv, D, cb, dtype)
        gs = _grads(B, T, H, Hkv, D, dtype)
        a = torch.full_like(qkv, float("nan")).copy_(qkv).requires_grad_(True)
        out = RoPEQKVFunction.apply(a, cos, sin, H, Hkv, D)
        torch.autograd.backward(out, gs)
        b = qkv.clone().requires_grad_(True)
        torch.autograd.backward(rope_qkv_reference(b, cos, sin, H, Hkv, D), gs)
        assert a.grad.is_contiguous() and _ulps(a.grad, b.grad) <= max_ulps, (B, T, H, Hkv, D, cb)

        a.grad = b.grad = None
        (RoPEQKVFunction.apply(a, cos, sin, H, Hkv, D)[0] * gs[0]).sum().backward()
        (rope_qkv_reference(b, cos, sin, H, Hkv, D)[0] * gs[0]).sum().backward()
        assert _ulps(a.grad, b.grad) <= max_ulps and not a.grad[..., H * D:].any()


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_reference_matches_transformers(dtype):
    """LlamaAttention's path: q/k views (B, h, T, D) of the projection, cos/sin from LlamaRotaryEmbedding.
    fp32: bit-identical (same ops in the same order). bf16: transformers rounds each product and the sum to
    bf16, the reference rounds once, so they differ by those roundings (bounded per element)."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb
    B, T, H, Hkv, D = 2, 7, 4, 2, 16
    cfg = LlamaConfig(hidden_size=H * D, num_attention_heads=H, num_key_value_heads=Hkv, num_hidden_layers=1,
                      intermediate_size=64, vocab_size=32, max_position_embeddings=64)
    g = torch.Generator().manual_seed(0)
    qkv = (torch.randn(B, T, (H + 2 * Hkv) * D, generator=g) * 2).to(dtype)
    pos = torch.stack([torch.arange(T), torch.arange(T) + 20])           # a different offset per row
    cos, sin = LlamaRotaryEmbedding(cfg)(qkv, pos)                       # (B, T, D) in qkv's dtype
    q, k, v = rope_qkv_reference(qkv, cos, sin, H, Hkv, D)

    qv = qkv[..., :H * D].view(B, T, -1, D).transpose(1, 2)
    kv = qkv[..., H * D:(H + Hkv) * D].view(B, T, -1, D).transpose(1, 2)
    tq, tk = apply_rotary_pos_emb(qv, kv, cos, sin)
    assert torch.equal(v, qkv[..., (H + Hkv) * D:].view(B, T, Hkv, D))
    for ours, theirs, x in ((q, tq, qv), (k, tk, kv)):
        theirs = theirs.transpose(1, 2)
        if dtype == torch.float32:
            assert torch.equal(ours, theirs)
            continue
        xf, c, s = x.float(), cos.float().unsqueeze(1), sin.float().unsqueeze(1)
        p1, p2 = xf * c, torch.cat((-xf[..., D // 2:], xf[..., :D // 2]), -1) * s
        bound = (2.0 ** -8 * (p1.abs() + p2.abs() + (p1 + p2).abs())).transpose(1, 2)   # 4 roundings of 2^-9
        assert ((ours.float() - theirs.float()).abs() <= bound).all()
        assert torch.equal(ours, (p1 + p2).to(dtype).transpose(1, 2))                   # one rounding


def test_odd_head_dim_and_bad_width_raise():
    qkv = torch.zeros(1, 2, 3 * 7)
    with pytest.raises(ValueError, match="even"):
        rope_qkv(qkv, torch.zeros(1, 2, 7), torch.zeros(1, 2, 7), 1, 1, 7)
    with pytest.raises(ValueError, match="qkv must be"):
        rope_qkv(torch.zeros(1, 2, 30), torch.zeros(1, 2, 8), torch.zeros(1, 2, 8), 1, 1, 8)


@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
def test_cuda_llama3_8b_layout():
    """Llama-3-8B's heads (H=32, Hkv=8, D=128), B=2, T=256, bf16 cos broadcast over the batch."""
    from fourbit.kernels.rope import RoPEQKVFunction
    B, T, H, Hkv, D = 2, 256, 32, 8, 128
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(B, T, (H + 2 * Hkv) * D, generator=g).to("cuda", torch.bfloat16)
    inv = 1.0 / 500000.0 ** (torch.arange(0, D, 2).float() / D)
    emb = torch.cat([torch.arange(T).float()[:, None] * inv] * 2, -1)[None].to("cuda")   # (1, T, D)
    cos, sin = emb.cos().bfloat16(), emb.sin().bfloat16()
    gs = [torch.randn(B, h, T, D, generator=g).to("cuda", torch.bfloat16).transpose(1, 2) for h in (H, Hkv, Hkv)]
    a = qkv.clone().requires_grad_(True)
    out = RoPEQKVFunction.apply(a, cos, sin, H, Hkv, D)
    torch.autograd.backward(out, gs)
    b = qkv.clone().requires_grad_(True)
    ref = rope_qkv_reference(b, cos, sin, H, Hkv, D)
    torch.autograd.backward(ref, gs)
    for o, r in zip(out, ref):
        assert _ulps(o, r) <= 1
    assert _ulps(a.grad, b.grad) <= 1

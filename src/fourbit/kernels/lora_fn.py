"""The LoRA fast path: one autograd function per LoRA linear over a frozen NF4 weight.

Why one function instead of autograd over `base(x) + B(A(dropout(x)))`: autograd would keep the
dequantized weight alive or dequantize it through a second function, save the (N, out) base output
for the add, cast the fp32 LoRA weights in separate graph nodes and run the LoRA update as three
separate kernels that each read or write an (N, out) tensor. Here the weight is dequantized once in
forward and once in backward (nothing of it is saved but the packed bytes), and only the input x
(shared by q/k/v, or gate/up) and the (N, r) projection h are saved.

The order of the two products: the small LoRA one is written first, y = h (s B)^T, and the base
GEMM then accumulates onto it, y += x W^T (cuBLAS with beta = 1: its epilogue reads y while the
GEMM is compute-bound, so the read is nearly free). The other order, y = x W^T and then
y += h (s B)^T, is a memory-bound `addmm_` that reads and writes all of y again: 28.6 ms of a
0.52 s Llama-3-8B step on the H200 (round-3 profile). dx in backward likewise. `Switches.lora_first`
off runs the other order (bench's ':noloraorder' rows).

The math (x: (N, in), W: (out, in) dequantized, A: (r, in), B: (out, r), s = alpha / r,
xd = dropout(x), xd = x when dropout is 0):

    h  = xd A^T                                 (N, r)
    y  = x W^T + h (s B)^T                      (N, out)
  backward, given gy = dL/dy:
    gh  = gy (s B)                              (N, r)
    dx  = gy W  [+ gh A when xd is x]           (N, in)
    dxd = gh A                                  (N, in)   only when dropout is on (autograd takes it through the mask)
    dA  = gh^T xd                               (r, in)
    dB  = s gy^T h                              (out, r)

Matmuls run in the activation dtype (bf16) with fp32 accumulation; the fp32 LoRA weights are cast
once per call (or per optimizer step, `lowp`), and their gradients are returned in fp32: on CUDA
the dA / dB GEMMs write fp32 straight from their fp32 accumulators (`_mm_f32`): no bf16 rounding of
the gradient before its fp32 copy (autograd through the cast makes one), and no cast kernel.
`lora_linear_reference` is the same function written with plain autograd; the tests compare them.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..switches import Switches
from .nf4 import NF4State, dequantize_nf4_fast, dequantize_nf4_reference


def lora_linear_reference(x: torch.Tensor, xd: Optional[torch.Tensor], weight: torch.Tensor, A: torch.Tensor,
                          B: torch.Tensor, scaling: float) -> torch.Tensor:
    """y = x W^T + (xd A^T)(s B)^T with plain autograd. weight: the dequantized (out, in) base weight."""
    xd = x if xd is None else xd
    a = A.to(x.dtype)
    b = (B * scaling).to(x.dtype)
    return F.linear(x, weight.to(x.dtype)) + F.linear(F.linear(xd, a), b)


class LoRANF4Function(torch.autograd.Function):
    """Frozen NF4 base + LoRA in one node. Inputs: x, xd (or None), A, B (fp32 params), packed, state, s."""

    @staticmethod
    def forward(ctx, x, xd, A, B, packed, state: NF4State, scaling: float, compute_y: bool = True,
                lowp: Optional[tuple] = None, keep_w: bool = False):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])                                       # (N, in)
        xd2 = x2 if xd is None else xd.reshape(-1, shape[-1])              # (N, in)
        a, b = lowp if lowp is not None else (A.to(x.dtype), (B * scaling).to(x.dtype))   # (r, in), (out, r)
        h = xd2 @ a.t()                                                     # (N, r)
        ctx.w = None
        if compute_y:
            w = dequantize_nf4_fast(packed, state)                          # (out, in)
            if w.dtype != x.dtype:
                w = w.to(x.dtype)
            y = _base_plus_lora(x2, w.t(), h, b.t())                       # (N, out)
            ctx.w = w if keep_w else None                                   # policy `keep`: no second dequant
            del w
        else:                          # a recompute whose output is never read: backward only (see docstring)
            y = x2.new_empty((x2.shape[0], B.shape[0]))
        ctx.save_for_backward(xd2, h, A, B)
        ctx.lowp = (a, b)
        ctx.packed, ctx.state, ctx.scaling = packed, state, scaling
        ctx.has_xd = xd is not None
        ctx.in_shape = shape
        return y.view(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, gy):
        xd2, h, A, B = ctx.saved_tensors
        gy2 = gy.reshape(-1, gy.shape[-1])                                  # (N, out)
        dt = gy2.dtype
        a, b = ctx.lowp
        if a.dtype != dt:
            a, b = A.to(dt), (B * ctx.scaling).to(dt)
        need_x, need_xd, need_a, need_b = ctx.needs_input_grad[:4]
        gh = gy2 @ b                                                        # (N, r)
        dx = dxd = dA = dB = None
        w, ctx.w = ctx.w, None
        if need_x:
            if w is None:
                w = dequantize_nf4_fast(ctx.packed, ctx.state)
            if w.dtype != dt:
                w = w.to(dt)
            dx = _base_plus_lora(gy2, w, gh, a) if not ctx.has_xd else gy2 @ w   # (N, in): gy W [+ gh A]
            dx = dx.view(ctx.in_shape)
        del w
        if ctx.has_xd and need_xd:
            dxd = (gh @ a).view(ctx.in_shape)
        if need_a:
            dA = _mm_f32(gh.t(), xd2)                                       # (r, in)
        if need_b:
            dB = _mm_f32(gy2.t(), h).mul_(ctx.scaling)                      # (out, r)
        return dx, dxd, dA, dB, None, None, None, None, None, None


def _base_plus_lora(x: torch.Tensor, wt: torch.Tensor, h: torch.Tensor, bt: torch.Tensor) -> torch.Tensor:
    """x wt + h bt: the small product written first, the big GEMM accumulating onto it (beta = 1)."""
    if Switches.lora_first:
        return (h @ bt).addmm_(x, wt)
    return (x @ wt).addmm_(h, bt)


_MM_OUT_DTYPE: Optional[bool] = None        # torch.mm(..., out_dtype=) works here (CUDA, torch >= 2.8)


def _mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b in fp32 (the LoRA weight gradients): on CUDA one GEMM that writes fp32 from its fp32
    accumulator (`out_dtype`), not a bf16 result and a cast kernel; elsewhere the cast."""
    global _MM_OUT_DTYPE
    if a.is_cuda and a.dtype != torch.float32 and _MM_OUT_DTYPE is not False and Switches.wgrad_f32:
        try:
            out = torch.mm(a, b, out_dtype=torch.float32)
            _MM_OUT_DTYPE = True
            return out
        except (TypeError, NotImplementedError):     # this torch has no out_dtype (not an OOM: that propagates)
            _MM_OUT_DTYPE = False
    return (a @ b).float()


def lora_nf4_linear(x: torch.Tensor, xd: Optional[torch.Tensor], A: torch.Tensor, B: torch.Tensor,
                    packed: torch.Tensor, state: NF4State, scaling: float, compute_y: bool = True,
                    lowp: Optional[tuple] = None, keep_w: bool = False) -> torch.Tensor:
    """Frozen NF4 linear + LoRA, one autograd node. xd: dropout(x), or None when dropout is 0.

    compute_y=False: the forward skips the base GEMM and returns an uninitialised tensor of the
    output's shape; backward is unchanged (it never reads y). For a recompute whose output only
    carries a gradient back (`train.activations`' split recompute of o_proj and down_proj).
    lowp: (A, s*B) already in x's dtype (`LoRALinear.lowp`, cast once per optimizer step), or None.
    keep_w: keep the dequantized weight from forward to backward instead of dequantizing it again
        (checkpointing policy `keep`: +2 bytes a weight until backward, one dequantization less).

    Args:
        x: (..., in) activations (bf16 on the GPU).
        A, B: LoRA weights (r, in), (out, r), fp32.
        packed, state: the NF4 weight and its `NF4State` (built once per layer).
    Returns:
        (..., out) in x's dtype.
    """
    return LoRANF4Function.apply(x, xd, A, B, packed, state, scaling, compute_y, lowp, keep_w)


def reference_weight(packed: torch.Tensor, state: NF4State) -> torch.Tensor:
    """The dequantized base weight through the torch reference (for tests)."""
    return dequantize_nf4_reference(packed, state)


class LoRANF4GroupFunction(torch.autograd.Function):
    """k frozen NF4 linears + LoRA that read the SAME input (q/k/v, gate/up), as one node.

    The k weights are dequantized into one (sum out, in) buffer and multiplied in one GEMM (fewer,
    larger GEMMs; one read of x); the k down-projections A are stacked so h = x [A_1; ...; A_k]^T is
    one (N, k r) GEMM, and the up-projections B_i form one block-diagonal (sum out, k r) matrix, so
    y = h [s B]_bd^T and, in backward, gh = gy [s B]_bd and dB are one GEMM each (the zero blocks add
    exactly 0; dB's off-diagonal blocks are computed and dropped, k r columns only). Dropout must
    be 0 (one shared x). Math per block i is that of `LoRANF4Function`; dx sums the k blocks inside one
    fp32-accumulated GEMM instead of adding k bf16 results.
    Inputs: x, k, packed list, state list, scaling, lowp (or None), keep_w, A_1..A_k, B_1..B_k.
    Output: (..., sum out).
    """

    @staticmethod
    def forward(ctx, x, k: int, packed: list, states: list, scaling: float, lowp: Optional[tuple], keep_w: bool,
                *ab):
        As, Bs = ab[:k], ab[k:]
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])                                       # (N, in)
        outs = [b.shape[0] for b in Bs]
        if lowp is None:
            lowp = group_lowp(As, Bs, scaling, x.dtype)
        a, bs, bd = lowp                                       # (k r, in), [(out_i, r_i)], (sum out, k r)
        w = _dequant_group(packed, states, outs, x2.shape[1], x.dtype)      # (sum out, in)
        h = x2 @ a.t()                                                      # (N, k r)
        if Switches.lora_first:
            y = _base_plus_lora(x2, w.t(), h, bd.t())                      # (N, sum out)
        else:
            y = x2 @ w.t()
            o, c = 0, 0
            for b in bs:
                r = b.shape[1]
                y[:, o:o + b.shape[0]].addmm_(h[:, c:c + r], b.t())
                o, c = o + b.shape[0], c + r
        ctx.w = w if keep_w else None
        del w
        ctx.lowp = lowp
        ctx.save_for_backward(x2, h, *As, *Bs)
        ctx.k, ctx.packed, ctx.states, ctx.scaling, ctx.in_shape = k, packed, states, scaling, shape
        return y.view(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, gy):
        x2, h, *ab = ctx.saved_tensors
        k, s = ctx.k, ctx.scaling
        As, Bs = ab[:k], ab[k:]
        gy2 = gy.reshape(-1, gy.shape[-1])                                  # (N, sum out)
        dt = gy2.dtype
        need_x = ctx.needs_input_grad[0]
        a, bs, bd = ctx.lowp
        if a.dtype != dt:
            a, bs, bd = group_lowp(As, Bs, s, dt)
        need_b = ctx.needs_input_grad[7 + k:]
        dBs = []
        if Switches.lora_first:        # one GEMM each over the block-diagonal s B (its zeros add exactly 0)
            gh = gy2 @ bd                                                   # (N, k r)
            dB = _mm_f32(gy2.t(), h).mul_(s) if any(need_b) else None       # (sum out, k r): blocks i,i used
            o, c = 0, 0
            for b, nb in zip(bs, need_b):
                dBs.append(dB[o:o + b.shape[0], c:c + b.shape[1]] if nb else None)
                o, c = o + b.shape[0], c + b.shape[1]
        else:
            gh = torch.empty(h.shape, dtype=dt, device=h.device)           # (N, k r)
            o, c = 0, 0
            for b, nb in zip(bs, need_b):
                out, r = b.shape
                g_i = gy2[:, o:o + out]                                     # (N, out_i) strided view
                gh[:, c:c + r] = g_i @ b                                    # (N, r_i)
                dBs.append(_mm_f32(g_i.t(), h[:, c:c + r]).mul_(s) if nb else None)
                o, c = o + out, c + r
        dx = None
        w, ctx.w = ctx.w, None
        if need_x:
            if w is None:
                w = _dequant_group(ctx.packed, ctx.states, [B.shape[0] for B in Bs], x2.shape[1], dt)
            dx = _base_plus_lora(gy2, w.to(dt), gh, a)                      # (N, in): gy W + gh A
            dx = dx.view(ctx.in_shape)
        del w
        dAs = []
        if any(ctx.needs_input_grad[7:7 + k]):
            dA = _mm_f32(gh.t(), x2)                                        # (k r, in)
            c = 0
            for A, need_a in zip(As, ctx.needs_input_grad[7:7 + k]):
                dAs.append(dA[c:c + A.shape[0]] if need_a else None)
                c += A.shape[0]
        else:
            dAs = [None] * k
        return (dx, None, None, None, None, None, None, *dAs, *dBs)


def group_lowp(As: list, Bs: list, scaling: float, dtype: torch.dtype) -> tuple:
    """The group's LoRA weights in `dtype`: (stacked A (k r, in), [s B_i (out_i, r_i)], block-diagonal
    s B (sum out, k r)). `lora.LoRAGroup.lowp` caches it per optimizer step."""
    bs = [(B.detach() * scaling).to(dtype) for B in Bs]
    return torch.cat([A.detach().to(dtype) for A in As]), bs, torch.block_diag(*bs)


def _dequant_group(packed: list, states: list, outs: list, din: int, dtype: torch.dtype) -> torch.Tensor:
    """The k weights dequantized into consecutive row blocks of one (sum outs, din) buffer."""
    st0 = states[0]
    w = torch.empty((sum(outs), din), dtype=st0.dtype, device=packed[0].device)
    o = 0
    for p, st, out in zip(packed, states, outs):
        dequantize_nf4_fast(p, st, out=w[o:o + out])
        o += out
    return w if w.dtype == dtype else w.to(dtype)


def lora_nf4_group(x: torch.Tensor, As: list, Bs: list, packed: list, states: list,
                   scaling: float, lowp: Optional[tuple] = None, keep_w: bool = False) -> torch.Tensor:
    """k frozen NF4 linears + LoRA on one input x (dropout 0), one autograd node.

    Args:
        x: (..., in). As[i]: (r_i, in), Bs[i]: (out_i, r_i) fp32. packed/states: the NF4 weights
        (all of one dtype) and their `NF4State`s. lowp: `group_lowp(...)` in x's dtype
        (`LoRAGroup.lowp`), or None to cast here.
    Returns:
        (..., sum out_i): the k outputs side by side (split with `torch.split`, whose backward is one cat).
    """
    return LoRANF4GroupFunction.apply(x, len(As), list(packed), list(states), scaling, lowp, keep_w, *As, *Bs)


def lora_group_reference(x: torch.Tensor, weights: list, As: list, Bs: list, scaling: float) -> torch.Tensor:
    """The group with plain autograd: k `lora_linear_reference` outputs concatenated."""
    return torch.cat([lora_linear_reference(x, None, w, A, B, scaling) for w, A, B in zip(weights, As, Bs)], -1)

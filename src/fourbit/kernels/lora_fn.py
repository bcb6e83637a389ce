"""The LoRA fast path: one autograd function per LoRA linear over a frozen NF4 weight.

Why one function instead of autograd over `base(x) + B(A(dropout(x)))`: autograd would keep the
dequantized weight alive or dequantize it through a second function, save the (N, out) base output
for the add, cast the fp32 LoRA weights in separate graph nodes and run the LoRA update as three
separate kernels that each read or write an (N, out) tensor. Here the weight is dequantized once in
forward and once in backward (nothing of it is saved but the packed bytes), the LoRA update is
folded into the base output by one in-place `addmm_` (the GEMM epilogue reads and writes it), and
only the input x (shared by q/k/v, or gate/up) and the (N, r) projection h are saved.

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
once per call, and their gradients are returned in fp32 (what autograd does through the cast).
`lora_linear_reference` is the same function written with plain autograd; the tests compare them.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

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
    def forward(ctx, x, xd, A, B, packed, state: NF4State, scaling: float):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])                                       # (N, in)
        xd2 = x2 if xd is None else xd.reshape(-1, shape[-1])              # (N, in)
        a = A.to(x.dtype)                                                   # (r, in)
        b = (B * scaling).to(x.dtype)                                       # (out, r)
        w = dequantize_nf4_fast(packed, state)                              # (out, in)
        if w.dtype != x.dtype:
            w = w.to(x.dtype)
        h = xd2 @ a.t()                                                     # (N, r)
        y = x2 @ w.t()                                                      # (N, out)
        y.addmm_(h, b.t())                                                  # y += h b^T, in the GEMM epilogue
        del w
        ctx.save_for_backward(xd2, h, A, B)
        ctx.packed, ctx.state, ctx.scaling = packed, state, scaling
        ctx.has_xd = xd is not None
        ctx.in_shape = shape
        return y.view(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, gy):
        xd2, h, A, B = ctx.saved_tensors
        gy2 = gy.reshape(-1, gy.shape[-1])                                  # (N, out)
        dt = gy2.dtype
        a = A.to(dt)
        b = (B * ctx.scaling).to(dt)
        need_x, need_xd, need_a, need_b = ctx.needs_input_grad[:4]
        gh = gy2 @ b                                                        # (N, r)
        dx = dxd = dA = dB = None
        if need_x:
            w = dequantize_nf4_fast(ctx.packed, ctx.state)
            if w.dtype != dt:
                w = w.to(dt)
            dx = gy2 @ w                                                    # (N, in)
            del w
            if not ctx.has_xd:
                dx.addmm_(gh, a)                                            # + gh A (same input)
            dx = dx.view(ctx.in_shape)
        if ctx.has_xd and need_xd:
            dxd = (gh @ a).view(ctx.in_shape)
        if need_a:
            dA = (gh.t() @ xd2).float()                                     # (r, in)
        if need_b:
            dB = (gy2.t() @ h).float().mul_(ctx.scaling)                    # (out, r)
        return dx, dxd, dA, dB, None, None, None


def lora_nf4_linear(x: torch.Tensor, xd: Optional[torch.Tensor], A: torch.Tensor, B: torch.Tensor,
                    packed: torch.Tensor, state: NF4State, scaling: float) -> torch.Tensor:
    """Frozen NF4 linear + LoRA, one autograd node. xd: dropout(x), or None when dropout is 0.

    Args:
        x: (..., in) activations (bf16 on the GPU).
        A, B: LoRA weights (r, in), (out, r), fp32.
        packed, state: the NF4 weight and its `NF4State` (built once per layer).
    Returns:
        (..., out) in x's dtype.
    """
    return LoRANF4Function.apply(x, xd, A, B, packed, state, scaling)


def reference_weight(packed: torch.Tensor, state: NF4State) -> torch.Tensor:
    """The dequantized base weight through the torch reference (for tests)."""
    return dequantize_nf4_reference(packed, state)

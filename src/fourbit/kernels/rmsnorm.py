"""RMSNorm with a frozen weight: one Triton kernel forward, one backward, saving only x and 1/rms.

Why: transformers' LlamaRMSNorm upcasts to fp32 and runs ~6 elementwise kernels, and autograd keeps
the fp32 copies (about 0.6 GiB per Llama-3-8B layer at 8,192 tokens) and replays them in backward.
The norm weight is frozen in QLoRA, so only dL/dx is needed.

Math (row x of H values, eps, weight w; fp32 inside, rounding as transformers does it):
    r     = 1 / sqrt(mean(x^2) + eps)
    xhat  = dtype(x * r)                       rounded to the activation dtype first, as transformers
    y     = dtype(w * xhat)
  backward, g = dL/dy:
    gw    = g * w                               (fp32)
    dx    = r * (gw - (x r) * mean(gw * x r))
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None


def rmsnorm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm, written out (autograd gives the backward)."""
    xf = x.float()
    r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * (xf * r).to(x.dtype)


if triton is not None:

    @triton.jit
    def _rmsnorm_fwd(x_ptr, a_ptr, w_ptr, h_ptr, y_ptr, r_ptr, H, eps, BLOCK: tl.constexpr, ADD: tl.constexpr):
        # ADD: the row is h = x + a (rounded as torch's add, written to h_ptr), normed as below
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < H
        x = tl.load(x_ptr + row * H + cols, mask=mask, other=0.0).to(tl.float32)
        if ADD:
            a = tl.load(a_ptr + row * H + cols, mask=mask, other=0.0).to(tl.float32)
            h = (x + a).to(h_ptr.dtype.element_ty)
            tl.store(h_ptr + row * H + cols, h, mask=mask)
            x = h.to(tl.float32)
        r = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / H + eps)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        xhat = (x * r).to(y_ptr.dtype.element_ty).to(tl.float32)
        tl.store(y_ptr + row * H + cols, (w * xhat).to(y_ptr.dtype.element_ty), mask=mask)
        tl.store(r_ptr + row, r)

    @triton.jit
    def _rmsnorm_bwd(g_ptr, gh_ptr, x_ptr, w_ptr, r_ptr, dx_ptr, H, BLOCK: tl.constexpr, ADD: tl.constexpr):
        # ADD: dx = round(the norm's gradient) + gh, as autograd's add of the two bf16 gradients
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < H
        g = tl.load(g_ptr + row * H + cols, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + row * H + cols, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        r = tl.load(r_ptr + row)
        gw = g * w
        xr = x * r
        c = tl.sum(gw * xr, axis=0) / H
        dx = r * (gw - xr * c)
        if ADD:
            gh = tl.load(gh_ptr + row * H + cols, mask=mask, other=0.0).to(tl.float32)
            dx = dx.to(dx_ptr.dtype.element_ty).to(tl.float32) + gh
        tl.store(dx_ptr + row * H + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)


def _launch_fwd(x2: torch.Tensor, a2, weight: torch.Tensor, eps: float):
    """`_rmsnorm_fwd` over the rows of x2 (+ a2 when given: ADD). Returns (h or None, y, 1/rms)."""
    H = x2.shape[-1]
    y = torch.empty_like(x2)
    h = torch.empty_like(x2) if a2 is not None else None
    r = torch.empty(x2.shape[0], dtype=torch.float32, device=x2.device)
    BLOCK = triton.next_power_of_2(H)
    _rmsnorm_fwd[(x2.shape[0],)](x2, x2 if a2 is None else a2, weight, y if h is None else h, y, r, H, eps,
                                 BLOCK=BLOCK, ADD=a2 is not None, num_warps=8 if BLOCK >= 4096 else 4)
    return h, y, r


def _launch_bwd(g2: torch.Tensor, gh2, x2: torch.Tensor, weight: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """`_rmsnorm_bwd` over the rows (+ gh2, the residual's gradient, when given: ADD). Returns dx."""
    H = x2.shape[-1]
    dx = torch.empty_like(x2)
    BLOCK = triton.next_power_of_2(H)
    _rmsnorm_bwd[(x2.shape[0],)](g2, g2 if gh2 is None else gh2, x2, weight, r, dx, H, BLOCK=BLOCK,
                                 ADD=gh2 is not None, num_warps=8 if BLOCK >= 4096 else 4)
    return dx


class RMSNormFunction(torch.autograd.Function):
    """Frozen-weight RMSNorm through the two Triton kernels (CUDA, or the interpreter in tests)."""

    @staticmethod
    def forward(ctx, x, weight, eps: float):
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        _, y, r = _launch_fwd(x2, None, weight, eps)
        ctx.save_for_backward(x2, weight, r)
        ctx.shape = x.shape
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, g):
        x2, weight, r = ctx.saved_tensors
        dx = _launch_bwd(g.reshape(-1, x2.shape[-1]).contiguous(), None, x2, weight, r)
        return dx.view(ctx.shape), None, None


# ---------------------------------------------------------------- residual add + RMSNorm, one kernel each way
#
# In a Llama-style layer the attention output is added to the residual stream and the sum is normed
# for the MLP: h = x + a; y = norm(h). As two kernels the norm reads h back from memory; in backward
# the norm writes dh_norm and autograd adds the residual's gradient in a second kernel. Here the
# forward writes h and y in one pass, and the backward writes dh = round(dh_norm) + g_h in one: the
# same bits as the two-kernel path (the norm's gradient is rounded to the activation dtype before
# the add, as autograd's add of two bf16 tensors sees it), so every checkpointing policy, which
# recomputes this with the two-kernel path, gives identical gradients.


def add_rmsnorm_reference(x: torch.Tensor, a: torch.Tensor, weight: torch.Tensor, eps: float):
    """(h, y) = (x + a, transformers' RMSNorm of h); autograd gives the backward."""
    h = x + a
    return h, rmsnorm_reference(h, weight, eps)


class AddRMSNormFunction(torch.autograd.Function):
    """(h, y) = (x + a, RMSNorm(h)) with a frozen weight: the RMSNorm kernels with ADD, one each way;
    saves h and 1/rms."""

    @staticmethod
    def forward(ctx, x, a, weight, eps: float):
        H = x.shape[-1]
        h, y, r = _launch_fwd(x.reshape(-1, H).contiguous(), a.reshape(-1, H).contiguous(), weight, eps)
        ctx.save_for_backward(h, weight, r)
        ctx.shape = x.shape
        return h.view(x.shape), y.view(x.shape)

    @staticmethod
    def backward(ctx, gh, gy):
        h2, weight, r = ctx.saved_tensors
        H = h2.shape[-1]
        gy2 = gy.reshape(-1, H).contiguous() if gy is not None else torch.zeros_like(h2)
        gh2 = gh.reshape(-1, H).contiguous() if gh is not None else torch.zeros_like(h2)
        dx = _launch_bwd(gy2, gh2, h2, weight, r).view(ctx.shape)
        return dx, dx, None, None


def add_rmsnorm(x: torch.Tensor, a: torch.Tensor, norm: "FusedRMSNorm"):
    """(x + a, norm(x + a)) for a `FusedRMSNorm`: one kernel each way on CUDA (the reference elsewhere)."""
    if x.is_cuda and triton is not None and not norm.weight.requires_grad:
        return AddRMSNormFunction.apply(x, a, norm.weight, norm.variance_epsilon)
    return add_rmsnorm_reference(x, a, norm.weight, norm.variance_epsilon)


class FusedRMSNorm(torch.nn.Module):
    """Drop-in for a Llama-style RMSNorm with a frozen weight (same parameter name `weight`)."""

    def __init__(self, weight: torch.nn.Parameter, eps: float):
        super().__init__()
        self.weight = weight
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and not self.weight.requires_grad:
            return RMSNormFunction.apply(x, self.weight, self.variance_epsilon)
        return rmsnorm_reference(x, self.weight, self.variance_epsilon)

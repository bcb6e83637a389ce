"""LM head + cross-entropy without materialising the (N, V) fp32 logits.

Why our own op: for a 128k vocabulary the plain path (`hidden @ W.T` -> `.float()` -> cross_entropy)
holds the bf16 logits, their fp32 copy and an fp32 gradient of the same size: about 12 GB at
N = 8192 tokens. Here tokens are processed in chunks and each chunk's gradients are produced in
the forward pass, so the peak extra memory is a few (chunk, V) buffers, whatever N is.

Per chunk: one GEMM gives the logits zl = h @ W.T (C, V) in the weight dtype, then
  - on CUDA (and on CPU under TRITON_INTERPRET=1): ONE Triton kernel, one program per row. Pass 1
    reads the row in blocks and keeps a running max and sum of exp in fp32 (online softmax) -> lse;
    pass 2 re-reads the row and writes dz = softmax - onehot, rounded to zl's dtype, IN PLACE over
    zl; the row loss lse - z_y (fp32) goes to a (C,) output. No fp32 (C, V) buffer exists: the
    chunk holds only zl (2V bytes a token in bf16). Without gradients only pass 1 runs.
  - elsewhere: `_chunk_ce_reference`, the same math in torch ops on an fp32 copy of zl
    (upcast, logsumexp, gather, exp in place, indexed -1, cast back): ~6 passes over (C, V) fp32.
dz (in zl's buffer) then feeds the two GEMMs dL/dh = dz @ W and dL/dW += dz^T h.

The math, per token t with hidden h_t, target y_t (ignored when y_t == ignore_index):

    z_t   = fp32(W h_t)                     logits in the weight dtype, upcast per chunk   (V,)
    lse_t = log sum_v exp(z_tv)
    loss  = sum_{t valid} (lse_t - z_{t,y_t})                                              scalar
    dL/dz_t = softmax(z_t) - onehot(y_t)     (0 for ignored tokens)
    dL/dh_t = W^T dz_t                       computed as dtype(dz_t) @ W, like autograd on the plain path
    dL/dW   = sum_t dz_t h_t^T               per chunk in the weight dtype, summed in fp32 (so in
                                             bf16 it carries ~1.3x the plain path's rounding error)

Ignored tokens are dropped before any compute (prompt tokens are often half of an SFT batch), so
an all-ignored batch costs nothing and gives loss 0 with zero gradients, never NaN. The loss is the
SUM over trainable tokens: the trainer divides by the trainable-token count of the whole
accumulated batch (backward then just scales the stored gradients by that factor).
Labels must already be aligned with the hidden positions (shifted by the caller).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..switches import Switches

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

IGNORE_INDEX = -100

# Kernel launch shape: columns per block (a power of two) and warps per row program. Not tuned on
# the device yet: 4096 bf16 columns = 8 KiB a load, 16 values a thread at 8 warps; V = 128256 takes
# 32 blocks a pass. Small registers so ~5 row programs fit an SM (C = 512 rows ~ one wave on an H200).
CE_BLOCK = 4096
CE_NUM_WARPS = 8


def _chunk_ce_reference(zl: torch.Tensor, y: torch.Tensor,
                        need_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-row CE of the logits zl (C, V) against y (C,) and dz = softmax - onehot, in torch ops.

    Returns (row_loss (C,) fp32 = lse - z_y, dz (C, V) in zl's dtype or None without need_grad).
    The fp32 copy of zl is built in place into dz; when zl is already fp32 `.float()` is zl itself,
    so zl is overwritten (callers that keep zl pass a clone).
    """
    z = zl.float()                                                               # (C, V) fp32
    lse = torch.logsumexp(z, dim=-1)                                             # (C,)
    row_loss = lse - z.gather(1, y[:, None]).squeeze(1)                          # (C,)
    if not need_grad:
        return row_loss, None
    # dL/dz = softmax(z) - onehot(y), built in place in z's buffer (no second (C, V) fp32).
    dz = z.sub_(lse[:, None]).exp_()
    dz[torch.arange(y.numel(), device=y.device), y] -= 1.0
    return row_loss, dz.to(zl.dtype)                                             # (C, V) like autograd's cast


if triton is not None:

    @triton.jit
    def _chunk_ce_kernel(z_ptr, y_ptr, loss_ptr, V, stride_z,
                         NEED_GRAD: tl.constexpr, BLOCK: tl.constexpr):
        """Row r of z (C, V): loss[r] = lse - z[r, y[r]]; with NEED_GRAD z[r] := softmax(z[r]) - onehot(y[r])."""
        row = tl.program_id(0).to(tl.int64)
        z_row = z_ptr + row * stride_z
        y = tl.load(y_ptr + row).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        # z_y is read before pass 2 overwrites the row; it also seeds the max (it is one of the row's
        # values, so the max is unchanged and m is finite from the start: no -inf - -inf).
        zy = tl.load(z_row + y).to(tl.float32)
        m = zy
        s = zy * 0.0
        # Pass 1: online softmax, per block one max and one sum (scalar carries, few registers).
        for v0 in range(0, V, BLOCK):
            cols = v0 + offs
            x = tl.load(z_row + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, axis=0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
            m = m_new
        lse = m + tl.log(s)
        tl.store(loss_ptr + row, lse - zy)
        if NEED_GRAD:
            # Pass 2: dz = exp(z - lse) - [v == y] in fp32, rounded once to z's dtype, in place.
            for v0 in range(0, V, BLOCK):
                cols = v0 + offs
                mask = cols < V
                x = tl.load(z_row + cols, mask=mask, other=0.0).to(tl.float32)
                p = tl.exp(x - lse)
                p = tl.where(cols == y, p - 1.0, p)
                tl.store(z_row + cols, p.to(z_ptr.dtype.element_ty), mask=mask)


from . import interpreting as _interpreting   # noqa: E402  (shared by the kernels)


# Decided once at import, as in nf4 / rope: the kernel object tells which mode it is in.
_INTERPRET = triton is not None and _interpreting(_chunk_ce_kernel)


def _use_kernel(t: torch.Tensor) -> bool:
    """The Triton kernel runs on CUDA tensors, and on CPU ones under the interpreter (tests).
    `Switches.ce_kernel` off (bench's ':noce' rows) runs the torch path instead."""
    return Switches.ce_kernel and triton is not None and (t.is_cuda or (_INTERPRET and t.device.type == "cpu"))


def _chunk_ce_triton(zl: torch.Tensor, y: torch.Tensor, need_grad: bool,
                     block: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`_chunk_ce_reference`'s results from one kernel: (row_loss (C,) fp32, dz or None).

    With need_grad dz is written IN PLACE over zl (C, V) (bf16 / fp16 / fp32, unit column stride)
    and returned as zl itself; without it zl is only read. block: columns per step (power of two;
    default min(CE_BLOCK, next_pow2(V))).
    """
    C, V = zl.shape
    if zl.stride(1) != 1:
        raise ValueError("zl must have unit column stride")
    y = y.contiguous()
    row_loss = torch.empty(C, dtype=torch.float32, device=zl.device)
    if C == 0:
        return row_loss, (zl if need_grad else None)
    block = block or min(CE_BLOCK, triton.next_power_of_2(V))
    _chunk_ce_kernel[(C,)](zl, y, row_loss, V, zl.stride(0), NEED_GRAD=need_grad, BLOCK=block,
                           num_warps=CE_NUM_WARPS)
    return row_loss, (zl if need_grad else None)


def lm_head_loss_reference(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                           ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """The plain path: full logits, upcast, summed cross-entropy over non-ignored tokens."""
    logits = hidden.reshape(-1, hidden.shape[-1]) @ weight.T          # (N, V) weight dtype
    return F.cross_entropy(logits.float(), labels.reshape(-1), reduction="sum", ignore_index=ignore_index)


class ChunkedLMHeadLoss(torch.autograd.Function):
    """Forward computes the loss and the gradients; backward scales the stored gradients."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, rows: torch.Tensor, targets: torch.Tensor,
                chunk_size: int, need_hidden_grad: bool, need_weight_grad: bool) -> torch.Tensor:
        # hidden (N, H); weight (V, H); rows (M,) indices of trainable tokens; targets (M,) their labels
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.zeros_like(hidden) if need_hidden_grad else None              # (N, H)
        grad_w = (torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
                  if need_weight_grad else None)                                     # (V, H) fp32 accumulator
        need_grad = grad_h is not None or grad_w is not None
        ce = _chunk_ce_triton if _use_kernel(hidden) else _chunk_ce_reference
        for s in range(0, rows.numel(), chunk_size):
            r, y = rows[s:s + chunk_size], targets[s:s + chunk_size]                 # (C,), (C,)
            h = hidden.index_select(0, r).to(weight.dtype)                           # (C, H)
            zl = h @ weight.T                                                        # (C, V) weight dtype
            row_loss, dz = ce(zl, y, need_grad)                                      # dz: zl's buffer (kernel)
            loss += row_loss.sum()
            if grad_h is not None:
                grad_h.index_copy_(0, r, (dz @ weight).to(hidden.dtype))             # (C, H)
            if grad_w is not None:
                grad_w += dz.T @ h                                                   # (V, H)
            del zl, dz, row_loss      # before the next chunk's logits exist: one chunk's buffers at a time
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        # Scale in fp32 and round once: grad_out is often 1 / n_tokens, inexact in bf16.
        gh = (grad_h.float() * grad_out).to(grad_h.dtype) if grad_h is not None else None
        gw = (grad_w * grad_out).to(ctx.weight_dtype) if grad_w is not None else None
        return gh, gw, None, None, None, None, None


def lm_head_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_size: int = 1024,
                 reduction: str = "sum", ignore_index: int = IGNORE_INDEX) -> tuple[torch.Tensor, int]:
    """Cross-entropy of `hidden @ weight.T` against `labels`, chunked over tokens.

    Args:
        hidden: (N, H) or (B, T, H) final hidden states (bf16 on the GPU path).
        weight: (V, H) output embedding; its gradient is computed only if it requires grad.
        labels: (N,) or (B, T) target ids aligned with `hidden`, `ignore_index` where no loss.
        chunk_size: tokens per chunk; peak extra memory is about chunk_size * V * 8 bytes on the torch
            path (bf16 weight), chunk_size * V * 2 with the Triton kernel (only the chunk's logits).
        reduction: "sum" (the trainer normalises) or "mean" over non-ignored tokens.
    Returns:
        (loss, n_tokens): fp32 scalar loss (0 when no token is trainable), the count of trainable tokens.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    H = hidden.shape[-1]
    flat_h = hidden.reshape(-1, H)                                    # (N, H)
    flat_y = labels.reshape(-1)                                       # (N,)
    if flat_y.numel() != flat_h.shape[0]:
        raise ValueError(f"labels hold {flat_y.numel()} tokens, hidden {flat_h.shape[0]}")
    # One host sync: which tokens are trainable (compute only on those).
    rows = (flat_y != ignore_index).nonzero().squeeze(1)             # (M,)
    targets = flat_y.index_select(0, rows)                            # (M,)
    n_tokens = rows.numel()
    loss = lm_head_loss_rows(flat_h, weight, rows, targets, chunk_size)
    if reduction == "mean":
        loss = loss / max(n_tokens, 1)
    return loss, n_tokens


def lm_head_loss_rows(hidden: torch.Tensor, weight: torch.Tensor, rows: torch.Tensor, targets: torch.Tensor,
                      chunk_size: int) -> torch.Tensor:
    """Summed CE of the rows `rows` of hidden (N, H) against `targets` (M,), no host sync.

    The label range is checked on the device (`torch._assert_async` on CUDA: a bad label fails the
    step with a device assert instead of costing a sync on every good one; on CPU it raises here).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if targets.numel():
        ok = ((targets >= 0) & (targets < weight.shape[0])).all()
        if targets.is_cuda:
            torch._assert_async(ok, f"labels must be in [0, {weight.shape[0]}) or {IGNORE_INDEX}")
        elif not bool(ok):
            raise ValueError(f"labels must be in [0, {weight.shape[0]}) or {IGNORE_INDEX}")
    grad_on = torch.is_grad_enabled()
    return ChunkedLMHeadLoss.apply(hidden, weight, rows, targets, chunk_size,
                                   grad_on and hidden.requires_grad, grad_on and weight.requires_grad)


def chunk_tokens(vocab: int, kernel: bool = False, budget_bytes: int = 512 * 2 ** 20, lo: int = 128,
                 hi: int = 8192) -> int:
    """Tokens per LM-head chunk so the chunk's buffers stay within `budget_bytes`.

    The torch path (`_chunk_ce_reference`, CPU): a chunk of C tokens holds its bf16 logits (2V bytes
    a token) while they are upcast to fp32 (4V), then the fp32 softmax (4V, in place) and its bf16
    copy dz (2V): at most ~8V bytes a token. The Triton kernel (`kernel=True`, CUDA) has no fp32
    buffers: dz overwrites the logits, 2V bytes a token, so the same budget holds 4x the tokens
    (larger chunks are faster: at Llama-3-8B 2,048 tokens ran ~3 ms a step faster than 512,
    benchmarks/NOTES.md). `train.loss` asks for that only under off / keep: the recomputing
    policies keep 512-token chunks, whose allocator behaviour the memory plan was verified on.
    512 MiB gives 512 tokens at a 128k vocabulary (Llama-3) on the torch path, 2,048 with the kernel;
    a multiple of 128, in [lo, hi].
    """
    c = budget_bytes // ((2 if kernel else 8) * max(1, vocab))
    return int(min(hi, max(lo, (c // 128) * 128)))

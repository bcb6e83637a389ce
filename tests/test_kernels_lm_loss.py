"""Chunked LM-head cross-entropy against the plain path (full logits -> fp32 -> F.cross_entropy).

Tolerances were measured (N=300, H=64, V=1000, chunk 64, 40% ignored, seed 0):
  float32: loss identical; grads rel. error 4e-7 (hidden), 3e-7 (weight) -> bounds 5e-6.
  bfloat16: loss rel. 1e-7; grads rel. 3.5e-3 against the plain path, but both are 2.5e-3 from the
  float64 truth: bf16 rounding noise. So in bf16 we bound the distance to the float64 truth to at
  most 1.25x the plain path's own for the hidden gradient (measured ratio 1.06) and 1.6x for the
  weight gradient (measured 1.31: each chunk's dW is rounded to bf16 before the fp32 sum, where the
  plain path rounds one big matmul once), plus a loose 1e-2 against the plain path.

The first tests run the torch path (`_chunk_ce_reference`: CPU without the interpreter). The Triton
per-chunk kernel is tested against it as in test_kernels_rope: without a GPU those tests re-run
themselves in a fresh process with TRITON_INTERPRET=1. The kernel's lse sums in another order than
torch.logsumexp, so fp32 results differ by fp32 rounding: dz is compared in units of eps * |lse| * p
(a rounding of lse moves p = softmax by p |lse| eps; at the target p - 1 cancels, so p, not |dz|).
The interpreter's fp32 -> bf16 cast truncates instead of rounding, so bf16 dz may be 1 ulp off the
reference there (fp16 rounds to nearest).
"""

import pytest
import torch

from fourbit.kernels import lm_loss as L
from fourbit.kernels.lm_loss import lm_head_loss, lm_head_loss_reference
from _triton_rerun import in_interpreter_or_rerun  # noqa: E402

ON_GPU = torch.cuda.is_available()
DEV = "cuda" if ON_GPU else "cpu"


def _in_interpreter_or_rerun(request):
    return in_interpreter_or_rerun(request, __file__)


def _problem(dtype, N=300, H=64, V=1000, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) * 0.2).to(dtype)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[torch.rand(N, generator=g) < 0.4] = -100
    labels[64:128] = -100          # a whole chunk of ignored tokens
    return hidden, weight, labels


def _grads(fn, hidden, weight, labels, scale, dtype=None):
    h = hidden.detach().to(dtype or hidden.dtype).requires_grad_()
    w = weight.detach().to(dtype or weight.dtype).requires_grad_()
    loss = fn(h, w, labels)
    (loss * scale).backward()
    return loss.detach().double(), h.grad.double(), w.grad.double()


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _ours(h, w, y):
    loss, _ = lm_head_loss(h, w, y, chunk_size=64)
    return loss


@pytest.mark.parametrize("scale", (1.0, 1 / 7))   # 1/7: the trainer's 1/n_tokens, inexact in bf16
def test_float32_matches_plain_path(scale):
    h, w, y = _problem(torch.float32)
    lo, gho, gwo = _grads(_ours, h, w, y, scale)
    lr, ghr, gwr = _grads(lm_head_loss_reference, h, w, y, scale)
    assert abs(lo - lr).item() <= 1e-6 * abs(lr).item()
    assert _rel(gho, ghr) < 5e-6 and _rel(gwo, gwr) < 5e-6


@pytest.mark.skipif(L._INTERPRET, reason="torch-path bound; the interpreter's bf16 cast truncates")
@pytest.mark.parametrize("scale", (1.0, 1 / 7))
def test_bfloat16_as_close_to_truth_as_plain_path(scale):
    h, w, y = _problem(torch.bfloat16)
    lo, gho, gwo = _grads(_ours, h, w, y, scale)
    lr, ghr, gwr = _grads(lm_head_loss_reference, h, w, y, scale)
    lt, ght, gwt = _grads(lm_head_loss_reference, h, w, y, scale, dtype=torch.float64)
    assert abs(lo - lr).item() <= 1e-5 * abs(lr).item()
    assert abs(lo - lt).item() <= 2e-4 * abs(lt).item()       # measured 5.6e-5 (bf16 logits)
    assert _rel(gho, ght) <= 1.25 * _rel(ghr, ght)
    assert _rel(gwo, gwt) <= 1.6 * _rel(gwr, gwt)
    assert _rel(gho, ghr) < 1e-2 and _rel(gwo, gwr) < 1e-2


def test_sum_and_count_and_mean():
    h, w, y = _problem(torch.float32)
    total, n = lm_head_loss(h, w, y, chunk_size=50)
    assert n == int((y != -100).sum())
    mean, n2 = lm_head_loss(h, w, y, chunk_size=1000, reduction="mean")
    assert n2 == n and torch.allclose(mean, total / n, rtol=1e-6)


def test_all_ignored_gives_zero_loss_and_zero_grads():
    h, w, _ = _problem(torch.bfloat16, N=40)
    y = torch.full((40,), -100)
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss, n = lm_head_loss(hh, ww, y, chunk_size=8)
    loss.backward()
    assert n == 0 and loss.item() == 0.0 and loss.dtype == torch.float32
    assert torch.count_nonzero(hh.grad) == 0 and torch.count_nonzero(ww.grad) == 0
    mean, _ = lm_head_loss(h, w, y, reduction="mean")
    assert mean.item() == 0.0


def test_frozen_weight_batched_input_and_no_grad():
    h, w, y = _problem(torch.float32, N=24)
    h3 = h.reshape(2, 12, -1).clone().requires_grad_()            # (B, T, H)
    loss, _ = lm_head_loss(h3, w, y.reshape(2, 12), chunk_size=5)
    loss.backward()
    assert h3.grad.shape == h3.shape and w.grad is None
    hr = h.clone().requires_grad_()
    lm_head_loss_reference(hr, w, y).backward()
    assert torch.allclose(h3.grad.reshape(24, -1), hr.grad, rtol=1e-5, atol=1e-7)
    with torch.no_grad():
        l2, _ = lm_head_loss(h.requires_grad_(), w, y)
    assert not l2.requires_grad and torch.allclose(l2, loss.detach(), rtol=1e-6)


def test_bad_labels_and_arguments_are_refused():
    h, w, y = _problem(torch.float32, N=8)
    with pytest.raises(ValueError, match="labels must be in"):
        lm_head_loss(h, w, torch.full((8,), w.shape[0]))
    with pytest.raises(ValueError, match="reduction"):
        lm_head_loss(h, w, y, reduction="none")
    with pytest.raises(ValueError, match="tokens"):
        lm_head_loss(h, w, y[:4])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_peak_memory_below_plain_path():
    N, H, V = 4096, 1024, 32000
    h = torch.randn(N, H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(V, H, device="cuda", dtype=torch.bfloat16) * 0.02
    y = torch.randint(0, V, (N,), device="cuda")
    peaks, grads = [], []
    for fn in (lambda: lm_head_loss(h, w, y, chunk_size=512)[0], lambda: lm_head_loss_reference(h, w, y)):
        h.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn().backward()
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated() - base)
        grads.append(h.grad.double())
    assert peaks[0] * 4 < peaks[1], peaks      # (N, V) fp32 logits = 512 MiB vs a 512-token chunk
    assert _rel(grads[0], grads[1]) < 1e-2


# ---- the Triton per-chunk kernel ------------------------------------------------------------------

def _ulps(a, b):
    """Largest distance in units of last place between two same-dtype half-precision tensors."""
    bits = {torch.bfloat16: torch.int16, torch.float16: torch.int16}[a.dtype]
    ia, ib = a.view(bits).int(), b.view(bits).int()
    ka = torch.where(ia < 0, -(ia & 0x7FFF), ia)      # bit pattern -> monotone integer
    kb = torch.where(ib < 0, -(ib & 0x7FFF), ib)
    return int((ka - kb).abs().max())


def _logits(C, V, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    zl = (torch.randn(C, V, generator=g) * 3).to(DEV, dtype)
    zl[0, 5] = 12.0                                   # one confident row: softmax near 1 somewhere
    y = torch.randint(0, V, (C,), generator=g)
    y[0], y[1], y[2] = 5, 0, V - 1                    # the confident column, first and last columns
    return zl, y.to(DEV)


def test_cpu_without_interpreter_uses_torch_path(monkeypatch):
    """No GPU, no interpreter: the torch ops of before the kernel, bit for bit (no kernel launched)."""
    if L._INTERPRET:
        pytest.skip("the interpreter routes CPU tensors to the kernel")
    assert not L._use_kernel(torch.zeros(1))
    monkeypatch.setattr(L, "_chunk_ce_triton", None)   # would fail if called

    def before(hidden, weight, labels, chunk):          # ChunkedLMHeadLoss.forward as it was, grads only
        rows = (labels != -100).nonzero().squeeze(1)
        loss, gh, gw = torch.zeros(()), torch.zeros_like(hidden), torch.zeros(weight.shape)
        for s in range(0, rows.numel(), chunk):
            r, y = rows[s:s + chunk], labels[rows[s:s + chunk]]
            h = hidden.index_select(0, r).to(weight.dtype)
            z = (h @ weight.T).float()
            lse = torch.logsumexp(z, dim=-1)
            loss += (lse - z.gather(1, y[:, None]).squeeze(1)).sum()
            dz = z.sub_(lse[:, None]).exp_()
            dz[torch.arange(y.numel()), y] -= 1.0
            dz = dz.to(weight.dtype)
            gh.index_copy_(0, r, (dz @ weight).to(hidden.dtype))
            gw += dz.T @ h
        return loss, gh, gw.to(weight.dtype)

    for dtype in (torch.float32, torch.bfloat16):
        h, w, y = _problem(dtype, N=100)
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        loss, _ = lm_head_loss(hh, ww, y, chunk_size=32)
        loss.backward()
        lb, ghb, gwb = before(h, w, y, 32)
        assert torch.equal(loss.detach(), lb) and torch.equal(hh.grad, ghb) and torch.equal(ww.grad, gwb)


def test_chunk_kernel_matches_reference(request):
    """Row losses and dz = softmax - onehot (written in place) vs `_chunk_ce_reference`: bf16, fp16, fp32
    logits; V a multiple of the block or not, one block or many; the no-grad pass leaves zl untouched."""
    if _in_interpreter_or_rerun(request):
        return
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for V, block in ((1000, None), (1000, 256), (1024, 256), (7, None)):
            zl, y = _logits(5, V, dtype)
            ref_loss, ref_dz = L._chunk_ce_reference(zl.clone(), y, True)
            buf = zl.clone()
            row_loss, dz = L._chunk_ce_triton(buf, y, True, block=block)
            assert dz.data_ptr() == buf.data_ptr() and dz.dtype == dtype          # in place, logits dtype
            assert row_loss.dtype == torch.float32 and row_loss.shape == (5,)
            tol = 1e-5 if dtype == torch.float32 else 1e-3
            assert ((row_loss - ref_loss).abs() <= tol * ref_loss.abs()).all(), (dtype, V, block)
            if dtype == torch.float32:
                # a rounding of lse (|lse| eps) moves p = exp(z - lse) by p |lse| eps; p = |dz| + onehot
                # since p - 1 cancels at the target. Measured <= 1.6 of this unit over 5 seeds.
                p = ref_dz.abs() + (torch.arange(V, device=DEV) == y[:, None])
                lse = torch.logsumexp(zl, dim=-1).abs().clamp_min(1)[:, None]
                assert ((dz - ref_dz).abs() <= 4 * torch.finfo(dtype).eps * p * lse).all(), (V, block)
            else:
                assert _ulps(dz, ref_dz) <= 1, (dtype, V, block)
            buf = zl.clone()
            nl, none = L._chunk_ce_triton(buf, y, False, block=block)
            assert none is None and torch.equal(buf, zl) and torch.equal(nl, row_loss)


def test_lm_head_loss_through_kernel(request):
    """The whole op (chunks, ignored tokens, both gradients, no-grad) with the kernel vs the plain path."""
    if _in_interpreter_or_rerun(request):
        return
    assert L._use_kernel(torch.zeros(1, device=DEV))
    for dtype in (torch.float32, torch.bfloat16):
        h, w, y = (t.to(DEV) for t in _problem(dtype, N=120, V=700))
        lo, gho, gwo = _grads(_ours, h, w, y, 1 / 7)
        lr, ghr, gwr = _grads(lm_head_loss_reference, h, w, y, 1 / 7)
        if dtype == torch.float32:
            assert abs(lo - lr).item() <= 1e-6 * abs(lr).item()
            assert _rel(gho, ghr) < 5e-6 and _rel(gwo, gwr) < 5e-6
        else:
            assert abs(lo - lr).item() <= 1e-5 * abs(lr).item()
            assert _rel(gho, ghr) < 1e-2 and _rel(gwo, gwr) < 1e-2
        with torch.no_grad():
            ln, _ = lm_head_loss(h, w, y, chunk_size=64)
        assert torch.equal(ln, lo.float())


@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
def test_cuda_llama3_chunk():
    """The H200 benchmark's chunk: C=512 tokens, V=128256, bf16 logits."""
    C, V = 512, 128256
    zl, y = _logits(C, V, torch.bfloat16)
    ref_loss, ref_dz = L._chunk_ce_reference(zl.clone(), y, True)
    buf = zl.clone()
    row_loss, dz = L._chunk_ce_triton(buf, y, True)
    assert ((row_loss - ref_loss).abs() <= 1e-3 * ref_loss.abs()).all()
    assert float((row_loss.sum() - ref_loss.sum()).abs()) <= 1e-5 * float(ref_loss.sum())
    assert _ulps(dz, ref_dz) <= 1
    assert (dz != ref_dz).float().mean().item() < 1e-2      # 1-ulp flips are rare; truncation would be ~1/2
    nl, _ = L._chunk_ce_triton(zl.clone(), y, False)
    assert torch.equal(nl, row_loss)

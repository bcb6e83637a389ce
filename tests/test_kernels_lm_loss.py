"""Chunked LM-head cross-entropy against the plain path (full logits -> fp32 -> F.cross_entropy).

Tolerances were measured (N=300, H=64, V=1000, chunk 64, 40% ignored, seed 0):
  float32: loss identical; grads rel. error 4e-7 (hidden), 3e-7 (weight) -> bounds 5e-6.
  bfloat16: loss rel. 1e-7; grads rel. 3.5e-3 against the plain path, but both are 2.5e-3 from the
  float64 truth: bf16 rounding noise. So in bf16 we bound the distance to the float64 truth to at
  most 1.25x the plain path's own for the hidden gradient (measured ratio 1.06) and 1.6x for the
  weight gradient (measured 1.31: each chunk's dW is rounded to bf16 before the fp32 sum, where the
  plain path rounds one big matmul once), plus a loose 1e-2 against the plain path.
"""
import pytest
import torch

from fourbit.kernels.lm_loss import lm_head_loss, lm_head_loss_reference


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

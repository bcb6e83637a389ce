"""Fused RMSNorm and SwiGLU Triton kernels against their torch references (TRITON_INTERPRET=1 on CPU).

As in test_kernels_nf4: the interpreter is chosen when a kernel is decorated, so without a GPU the
kernel tests re-run themselves in a fresh process with TRITON_INTERPRET=1.
"""

import pytest
import torch
from _triton_rerun import in_interpreter_or_rerun  # noqa: E402

triton = pytest.importorskip("triton")

ON_GPU = torch.cuda.is_available()
DEV = "cuda" if ON_GPU else "cpu"


def _in_interpreter_or_rerun(request):
    return in_interpreter_or_rerun(request, __file__)


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_rmsnorm_matches_reference(dtype, request):
    if _in_interpreter_or_rerun(request):
        return
    from fourbit.kernels.rmsnorm import RMSNormFunction, rmsnorm_reference
    g = torch.Generator().manual_seed(0)
    for H in (96, 128):                     # a non-power-of-two row and a power of two
        x = (torch.randn(3, 5, H, generator=g) * 3).to(DEV, dtype)
        w = (torch.rand(H, generator=g) + 0.5).to(DEV, dtype)
        gy = torch.randn(3, 5, H, generator=g).to(DEV, dtype)
        xa = x.clone().requires_grad_(True)
        y = RMSNormFunction.apply(xa, w, 1e-5)
        y.backward(gy)
        xb = x.clone().requires_grad_(True)
        yr = rmsnorm_reference(xb, w, 1e-5)
        yr.backward(gy)
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        assert _rel(y, yr) < tol and _rel(xa.grad, xb.grad) < tol


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_swiglu_matches_reference(dtype, request):
    if _in_interpreter_or_rerun(request):
        return
    from fourbit.kernels.swiglu import SwiGLUFunction, swiglu_reference
    gen = torch.Generator().manual_seed(1)
    shape = (3, 700)                        # not a multiple of the block: masked tail
    g = (torch.randn(shape, generator=gen) * 4).to(DEV, dtype)
    u = torch.randn(shape, generator=gen).to(DEV, dtype)
    d = torch.randn(shape, generator=gen).to(DEV, dtype)
    ga, ua = g.clone().requires_grad_(True), u.clone().requires_grad_(True)
    h = SwiGLUFunction.apply(ga, ua)
    h.backward(d)
    gb, ub = g.clone().requires_grad_(True), u.clone().requires_grad_(True)
    hr = swiglu_reference(gb, ub)
    hr.backward(d)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert _rel(h, hr) < tol and _rel(ga.grad, gb.grad) < tol and _rel(ua.grad, ub.grad) < tol


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_swiglu_packed_matches_reference(dtype, request):
    """gu = [gate | up] from one fused GEMM: same values and gradient as the two-tensor kernel's math."""
    if _in_interpreter_or_rerun(request):
        return
    from fourbit.kernels.swiglu import SwiGLUPackedFunction, swiglu_packed_reference
    gen = torch.Generator().manual_seed(2)
    gu = (torch.randn(2, 3, 2 * 700, generator=gen) * 4).to(DEV, dtype)   # I = 700: masked tail
    d = torch.randn(2, 3, 700, generator=gen).to(DEV, dtype)
    a = torch.full_like(gu, float("nan")).copy_(gu).requires_grad_(True)
    h = SwiGLUPackedFunction.apply(a)
    h.backward(d)
    b = gu.clone().requires_grad_(True)
    hr = swiglu_packed_reference(b)
    hr.backward(d)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert h.shape == (2, 3, 700) and torch.isfinite(a.grad).all()
    assert _rel(h, hr) < tol and _rel(a.grad, b.grad) < tol


def test_fuse_layers_swaps_and_keeps_names():
    from fourbit.shapes import build_random_model
    from fourbit.train.activations import fuse_layers, unfuse_layers
    model = build_random_model("tiny", "cpu", quant="none").float()    # fp32: RoPE's single rounding is exact
    names = sorted(n for n, _ in model.named_parameters())
    ids = torch.randint(3, 1024, (1, 16), generator=torch.Generator().manual_seed(0))
    before = model(input_ids=ids).logits
    assert fuse_layers(model) == 2 * 2 + 1 + 2 + 2      # 2 norms a layer, the final norm, 2 MLPs, 2 attentions
    assert fuse_layers(model) == 0                       # idempotent
    assert sorted(n for n, _ in model.named_parameters()) == names
    assert torch.equal(model(input_ids=ids).logits, before)   # CPU: the references, same math
    unfuse_layers(model)
    assert type(model.model.norm).__name__ == "LlamaRMSNorm" and "forward" not in model.model.layers[0].mlp.__dict__
    assert "forward" not in model.model.layers[0].self_attn.__dict__


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_add_rmsnorm_equals_add_then_rmsnorm_bitwise(dtype, request):
    """One kernel each way for h = x + a, y = RMSNorm(h): in bf16 on a GPU the same bits as torch's add
    and the RMSNorm kernel (forward and every gradient), which the recomputing policies run."""
    if _in_interpreter_or_rerun(request):
        return
    from fourbit.kernels.rmsnorm import AddRMSNormFunction, RMSNormFunction, add_rmsnorm_reference
    g = torch.Generator().manual_seed(4)
    for H in (96, 128):
        x, a = ((torch.randn(2, 5, H, generator=g) * 2).to(DEV, dtype) for _ in range(2))
        w = (torch.rand(H, generator=g) + 0.5).to(DEV, dtype)
        gh, gy = (torch.randn(2, 5, H, generator=g).to(DEV, dtype) for _ in range(2))

        def run(fn):
            xx, aa = x.clone().requires_grad_(True), a.clone().requires_grad_(True)
            h, y = fn(xx, aa)
            torch.autograd.backward([h, y], [gh, gy])
            return [h.detach(), y.detach(), xx.grad, aa.grad]
        fused = run(lambda xx, aa: AddRMSNormFunction.apply(xx, aa, w, 1e-5))
        two = run(lambda xx, aa: (lambda h: (h, RMSNormFunction.apply(h, w, 1e-5)))(xx + aa))
        for f, t in zip(fused, two):
            if ON_GPU and dtype == torch.bfloat16:      # training's case: the same bits
                assert torch.equal(f, t)
            elif dtype == torch.float32:   # fp32 on a GPU: the compiler may fuse r * (...) + g_h into one FMA
                assert _rel(f, t) < 1e-6
            else:       # Triton's interpreter does not round fp32 -> bf16 to nearest even as torch and GPUs do
                assert _rel(f, t) < 1e-2
        ref = run(lambda xx, aa: add_rmsnorm_reference(xx, aa, w, 1e-5))
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        for f, r in zip(fused, ref):
            assert _rel(f, r) < tol

"""The LoRA fast path (fourbit.kernels.lora_fn) against plain autograd, and LoRALinear's two paths.

The function runs on CPU too (the dequantization then goes through bitsandbytes / the torch
reference), so CI checks its forward and every gradient; the GPU test checks the Triton path and
that LoRALinear's CUDA fast path equals its CPU path.
"""
import pytest
import torch

bnbf = pytest.importorskip("bitsandbytes.functional")

from fourbit.kernels.lora_fn import lora_linear_reference, lora_nf4_linear  # noqa: E402
from fourbit.kernels.nf4 import NF4State, dequantize_nf4_reference  # noqa: E402


def _case(n=24, din=128, dout=192, r=4, dtype=torch.float32, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(dout, din, generator=g) * 0.05).to(dtype)
    packed, qs = bnbf.quantize_4bit(w.to(device), blocksize=64, compress_statistics=True, quant_type="nf4")
    x = torch.randn(2, n // 2, din, generator=g).to(device, dtype)
    A = (torch.randn(r, din, generator=g) * 0.1).to(device)
    B = (torch.randn(dout, r, generator=g) * 0.1).to(device)
    return x, packed, qs, A, B


def _grads(fn, x, A, B, gy):
    x = x.clone().requires_grad_(True)
    A = A.clone().requires_grad_(True)
    B = B.clone().requires_grad_(True)
    y = fn(x, A, B)
    y.backward(gy)
    return y.detach(), x.grad, A.grad, B.grad


@pytest.mark.parametrize("lora_first", (True, False))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_matches_autograd_reference(dtype, lora_first):
    """Both orders of the two products (`Switches.lora_first`: the LoRA product written first and the
    base GEMM accumulating onto it, or the other way round) give autograd's output and gradients."""
    from fourbit.switches import Switches
    x, packed, qs, A, B = _case(dtype=dtype)
    w = dequantize_nf4_reference(packed, qs)
    gy = torch.randn(x.shape[:-1] + (w.shape[0],), generator=torch.Generator().manual_seed(1)).to(dtype)
    with Switches.set(lora_first=lora_first):
        fast = _grads(lambda x, A, B: lora_nf4_linear(x, None, A, B, packed, qs, 2.0), x, A, B, gy)
    assert Switches.lora_first
    ref = _grads(lambda x, A, B: lora_linear_reference(x, None, w, A, B, 2.0), x, A, B, gy)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for f, r in zip(fast, ref):
        assert f.dtype == r.dtype and f.shape == r.shape
        assert (f.float() - r.float()).norm() / r.float().norm() < tol


def test_dropout_input_gets_its_own_gradient():
    """With dropout, x feeds the base and xd = dropout(x) the adapter: gradients flow through both."""
    x, packed, qs, A, B = _case()
    w = dequantize_nf4_reference(packed, qs)
    mask = (torch.rand(x.shape, generator=torch.Generator().manual_seed(2)) > 0.3).float() / 0.7
    gy = torch.randn(x.shape[:-1] + (w.shape[0],))
    fast = _grads(lambda x, A, B: lora_nf4_linear(x, x * mask, A, B, packed, qs, 0.5), x, A, B, gy)
    ref = _grads(lambda x, A, B: lora_linear_reference(x, x * mask, w, A, B, 0.5), x, A, B, gy)
    for f, r in zip(fast, ref):
        assert torch.allclose(f, r, rtol=1e-5, atol=1e-6)


def test_no_input_grad_skips_dx():
    """First-layer inputs need no gradient: only A and B get one (and the base dequant is skipped)."""
    x, packed, qs, A, B = _case()
    A.requires_grad_(True)
    B.requires_grad_(True)
    y = lora_nf4_linear(x, None, A, B, packed, NF4State.from_quant_state(qs), 1.0)
    y.sum().backward()
    assert A.grad is not None and B.grad is not None and not x.requires_grad


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_lora_linear_cuda_fast_path_equals_cpu_path():
    import bitsandbytes as bnb
    from fourbit.lora import LoRALinear
    torch.manual_seed(0)
    w = torch.randn(256, 512, dtype=torch.bfloat16) * 0.05
    lin = bnb.nn.Linear4bit(512, 256, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4",
                            compress_statistics=True, device="meta")
    lin.weight = bnb.nn.Params4bit(w, requires_grad=False, **lin.weight.__dict__).to("cuda")
    layer = LoRALinear(lin, r=8, alpha=16).cuda()
    layer.reset_parameters(torch.Generator().manual_seed(0))
    with torch.no_grad():
        layer.lora_B.weight.normal_(0, 0.1)
    x = torch.randn(3, 64, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = layer(x)
    y.float().square().sum().backward()
    fast = (y.detach(), x.grad.clone(), layer.lora_A.weight.grad.clone(), layer.lora_B.weight.grad.clone())
    x.grad = None
    layer.lora_A.weight.grad = layer.lora_B.weight.grad = None
    y2 = LoRALinear.base_forward(layer, x) + torch.nn.functional.linear(
        torch.nn.functional.linear(x, layer.lora_A.weight.to(x.dtype)),
        (layer.lora_B.weight * layer.scaling).to(x.dtype))
    y2.float().square().sum().backward()
    slow = (y2.detach(), x.grad, layer.lora_A.weight.grad, layer.lora_B.weight.grad)
    for f, s in zip(fast, slow):
        assert (f.float() - s.float()).norm() / s.float().norm() < 1e-2


@pytest.mark.parametrize("lora_first", (True, False))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_group_matches_separate_layers(dtype, lora_first):
    """q/k/v (or gate/up) as one node: same outputs and gradients as k separate LoRA linears, with the
    block-diagonal s B (lora_first) and with per-block products."""
    from fourbit.kernels.lora_fn import lora_group_reference, lora_nf4_group
    from fourbit.switches import Switches
    g = torch.Generator().manual_seed(5)
    din, outs, r = 128, (192, 64, 64), 4
    x = torch.randn(2, 6, din, generator=g).to(dtype)
    packs, states, ws, As, Bs = [], [], [], [], []
    for o in outs:
        w = (torch.randn(o, din, generator=g) * 0.05).to(dtype)
        p, qs = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
        packs.append(p)
        states.append(NF4State.from_quant_state(qs))
        ws.append(dequantize_nf4_reference(p, qs))
        As.append(torch.randn(r, din, generator=g) * 0.1)
        Bs.append(torch.randn(o, r, generator=g) * 0.1)
    gy = torch.randn(2, 6, sum(outs), generator=g).to(dtype)

    def run(fn):
        xx = x.clone().requires_grad_(True)
        aa = [a.clone().requires_grad_(True) for a in As]
        bb = [b.clone().requires_grad_(True) for b in Bs]
        y = fn(xx, aa, bb)
        y.backward(gy)
        return [y.detach(), xx.grad] + [a.grad for a in aa] + [b.grad for b in bb]

    with Switches.set(lora_first=lora_first):
        fast = run(lambda xx, aa, bb: lora_nf4_group(xx, aa, bb, packs, states, 2.0))
    ref = run(lambda xx, aa, bb: lora_group_reference(xx, ws, aa, bb, 2.0))
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for f, rr in zip(fast, ref):
        assert f.dtype == rr.dtype and f.shape == rr.shape
        assert (f.float() - rr.float()).norm() / rr.float().norm() < tol


def _tiny_lora(device, seed=0):
    from fourbit.config import LoraConfig
    from fourbit.lora import apply_lora, lora_parameters
    from fourbit.shapes import build_random_model
    model = build_random_model("tiny", device, quant="nf4", seed=seed)
    apply_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0, targets="all-linear"), seed=1)
    with torch.no_grad():
        for i, p in enumerate(lora_parameters(model)):
            p.normal_(0, 0.05, generator=torch.Generator(p.device).manual_seed(i))
    return model


def _loss_and_grads(model, ids):
    from fourbit.lora import lora_parameters
    from fourbit.train.loss import causal_lm_loss
    ls, n = causal_lm_loss(model, {"input_ids": ids, "labels": ids})
    ls.backward()
    out = float(ls.detach()), [p.grad.clone() for p in lora_parameters(model)]
    for p in lora_parameters(model):
        p.grad = None
    return out


def test_flat_lora_same_update_as_per_tensor():
    """FlatLoRA: weights are views of one buffer; AdamW on it gives the per-tensor update exactly."""
    from fourbit.lora import FlatLoRA, lora_parameters
    ids = torch.randint(3, 1024, (2, 16), generator=torch.Generator().manual_seed(0))
    models = [_tiny_lora("cpu"), _tiny_lora("cpu")]
    fl = FlatLoRA(models[1])
    assert all(p.data_ptr() >= fl.flat.data_ptr() for p in lora_parameters(models[1]))
    opts = [torch.optim.AdamW(lora_parameters(models[0]), lr=1e-2, weight_decay=0.1),
            torch.optim.AdamW([fl.flat], lr=1e-2, weight_decay=0.1)]
    for _ in range(2):
        for k, (m, o) in enumerate(zip(models, opts)):
            from fourbit.train.loss import causal_lm_loss
            ls, _ = causal_lm_loss(m, {"input_ids": ids, "labels": ids})
            ls.backward()
            if k:
                fl.gather_grads()
            o.step()
            o.zero_grad(set_to_none=True)
            if k:
                fl.zero_grad()
    for a, b in zip(lora_parameters(models[0]), lora_parameters(models[1])):
        assert torch.allclose(a, b, rtol=0, atol=1e-7)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_grouped_qkv_and_gate_up_equal_separate_layers():
    """fuse_layers' LoRA groups (q/k/v and gate/up as one GEMM each) change nothing beyond bf16 noise."""
    from fourbit.lora import LoRAGroup
    from fourbit.train.activations import fuse_layers, unfuse_layers
    ids = torch.randint(3, 1024, (2, 64), generator=torch.Generator().manual_seed(0)).cuda()
    model = _tiny_lora("cuda")
    model.train()
    ref = _loss_and_grads(model, ids)
    fuse_layers(model)
    assert isinstance(model.model.layers[0].self_attn.k_proj.__dict__.get("_fourbit_group"), LoRAGroup)
    got = _loss_and_grads(model, ids)
    unfuse_layers(model)
    assert "_fourbit_group" not in model.model.layers[0].self_attn.q_proj.__dict__
    assert abs(got[0] - ref[0]) / ref[0] < 1e-3
    for g, r in zip(got[1], ref[1]):
        assert (g - r).norm() / r.norm() < 3e-2


def _lora_layer(device="cpu"):
    import torch.nn as nn
    from fourbit.lora import LoRALinear
    lin = LoRALinear(nn.Linear(32, 24, bias=False).to(device), r=4, alpha=8)
    with torch.no_grad():
        lin.lora_B.weight.normal_()
    return lin


def test_lowp_cache_is_per_step_and_invalidated_by_the_optimizer_hook():
    """Cached (A, s*B) casts: reused between optimizer steps, refreshed after each step (also when the
    optimizer writes behind autograd's back, as bitsandbytes' kernels do), never cached when off."""
    from fourbit.lora import cache_optimizer_steps
    lin = _lora_layer()
    a1, b1 = lin.lowp(torch.bfloat16)
    assert lin.lowp(torch.bfloat16)[0] is not a1                    # off: a fresh cast each call
    opt = torch.optim.SGD([lin.lora_A.weight, lin.lora_B.weight], lr=0.1)
    hook = cache_optimizer_steps(opt, lin)
    try:
        a1, b1 = lin.lowp(torch.bfloat16)
        assert lin.lowp(torch.bfloat16)[0] is a1                    # cached within a step
        torch.testing.assert_close(b1, (lin.lora_B.weight * lin.scaling).to(torch.bfloat16), rtol=0, atol=0)
        lin.lora_A.weight.data.add_(1.0)                            # a raw write: no version bump, no hook
        assert lin.lowp(torch.bfloat16)[0] is a1                    # (why the hook is needed)
        for p in (lin.lora_A.weight, lin.lora_B.weight):
            p.grad = torch.ones_like(p)
        opt.step()                                                  # the hook invalidates
        a2, b2 = lin.lowp(torch.bfloat16)
        assert a2 is not a1
        torch.testing.assert_close(a2, lin.lora_A.weight.detach().to(torch.bfloat16), rtol=0, atol=0)
        torch.testing.assert_close(b2, (lin.lora_B.weight * lin.scaling).to(torch.bfloat16), rtol=0, atol=0)
        with torch.no_grad():
            lin.lora_B.weight.mul_(2)                               # torch in-place: the version counter refreshes it
        assert lin.lowp(torch.bfloat16)[1] is not b2
    finally:
        hook.remove()
    assert lin.lowp(torch.bfloat16)[0] is not lin.lowp(torch.bfloat16)[0]   # removed: no cache again


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_lowp_cache_trains_identically_with_paged_adamw():
    """Three steps of bitsandbytes' paged AdamW (raw-pointer updates) through the fast path: cached
    casts give bit-identical weights to casting per call."""
    import bitsandbytes as bnb
    from fourbit.config import LoraConfig
    from fourbit.lora import FlatLoRA, apply_lora, cache_optimizer_steps
    from fourbit.shapes import build_random_model
    from fourbit.train.activations import apply_checkpointing
    from fourbit.train.loss import causal_lm_loss
    ids = torch.randint(3, 1024, (2, 64), generator=torch.Generator().manual_seed(0)).cuda()
    finals = []
    for cached in (False, True):
        model = build_random_model("tiny", "cuda", quant="nf4")
        apply_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0, targets="all-linear"), seed=0)
        apply_checkpointing(model, "off")
        model.train()
        fl = FlatLoRA(model)
        opt = bnb.optim.PagedAdamW32bit([fl.flat], lr=1e-2)
        hook = cache_optimizer_steps(opt, model) if cached else None
        for _ in range(3):
            ls, n = causal_lm_loss(model, {"input_ids": ids, "labels": ids})
            (ls / n).backward()
            fl.gather_grads()
            opt.step()
            fl.zero_grad()
        if hook is not None:
            hook.remove()
        finals.append((float(ls), fl.flat.detach().clone()))
    assert finals[0][0] == finals[1][0]
    assert torch.equal(finals[0][1], finals[1][1])


def test_group_lowp_cache_follows_its_members_clock():
    """LoRAGroup's stacked casts: cached while the members' optimizer clock stands, refreshed after a step."""
    from fourbit.lora import LoRAGroup, cache_optimizer_steps
    import torch.nn as nn
    ms = [_lora_layer(), _lora_layer()]
    holder = nn.ModuleList(ms)
    grp = LoRAGroup(ms)
    for m in ms:
        m.__dict__["_fourbit_group"] = grp                        # as fuse_layers attaches it
    opt = torch.optim.SGD([p for m in ms for p in (m.lora_A.weight, m.lora_B.weight)], lr=0.1)
    a0, _, _ = grp.lowp(torch.bfloat16)
    assert grp.lowp(torch.bfloat16)[0] is not a0                  # no clock: no cache
    h = cache_optimizer_steps(opt, holder)
    a1, bs1, bd1 = grp.lowp(torch.bfloat16)
    assert grp.lowp(torch.bfloat16)[0] is a1
    torch.testing.assert_close(a1, torch.cat([m.lora_A.weight.to(torch.bfloat16) for m in ms]), rtol=0, atol=0)
    torch.testing.assert_close(bd1, torch.block_diag(*[(m.lora_B.weight * m.scaling).to(torch.bfloat16) for m in ms]),
                               rtol=0, atol=0)
    for m in ms:
        m.lora_A.weight.grad = torch.ones_like(m.lora_A.weight)
    opt.step()
    a2, _, _ = grp.lowp(torch.bfloat16)
    assert a2 is not a1
    torch.testing.assert_close(a2, torch.cat([m.lora_A.weight.detach().to(torch.bfloat16) for m in ms]), rtol=0, atol=0)
    h.remove()
    assert grp._lowp is None and grp.lowp(torch.bfloat16)[0] is not grp.lowp(torch.bfloat16)[0]


def test_keep_w_gives_the_same_output_and_gradients():
    """keep_w (policy `keep`) keeps the forward's dequantized weight for backward: bit-identical results,
    single linear and group."""
    from fourbit.kernels.lora_fn import lora_nf4_group
    x, packed, qs, A, B = _case(dtype=torch.bfloat16)
    gy = torch.randn(x.shape[:-1] + (192,), generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    runs = [_grads(lambda x, A, B, k=k: lora_nf4_linear(x, None, A, B, packed, qs, 2.0, keep_w=k), x, A, B, gy)
            for k in (False, True)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    st = NF4State.from_quant_state(qs)
    As, Bs = [A, A * 0.5], [B, B[:64] * 2]
    gy2 = torch.randn(x.shape[:-1] + (256,), generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    outs = []
    for k in (False, True):
        xx = x.clone().requires_grad_(True)
        aa = [a.clone().requires_grad_(True) for a in As]
        bb = [b.clone().requires_grad_(True) for b in Bs]
        p2, qs2 = bnbf.quantize_4bit(torch.randn(64, 128, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16),
                                     blocksize=64, compress_statistics=True, quant_type="nf4")
        y = lora_nf4_group(xx, aa, bb, [packed, p2], [st, NF4State.from_quant_state(qs2)], 2.0, keep_w=k)
        y.backward(gy2)
        outs.append([y.detach(), xx.grad] + [t.grad for t in aa + bb])
    for a, b in zip(*outs):
        assert torch.equal(a, b)

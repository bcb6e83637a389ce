"""Checkpointing policies: same loss and LoRA gradients as no checkpointing; auto picks by budget."""
import pytest
import torch

pytest.importorskip("bitsandbytes")

from fourbit.config import LoraConfig  # noqa: E402
from fourbit.lora import apply_lora, lora_parameters  # noqa: E402
from fourbit.shapes import build_random_model  # noqa: E402
from fourbit.train.activations import apply_checkpointing, remove_checkpointing  # noqa: E402
from fourbit.train.loss import causal_lm_loss  # noqa: E402


def _grads(model, ids, policy):
    apply_checkpointing(model, policy)
    for p in lora_parameters(model):
        p.grad = None
    ls, n = causal_lm_loss(model, {"input_ids": ids, "labels": ids})
    (ls / n).backward()
    remove_checkpointing(model)
    return float(ls), [p.grad.clone() for p in lora_parameters(model)]


def _model(device, dropout=0.0):
    model = build_random_model("tiny", device, quant="nf4")
    apply_lora(model, LoraConfig(r=4, alpha=8, dropout=dropout, targets="all-linear"), seed=0)
    with torch.no_grad():                      # nonzero B so every gradient is exercised
        for p in lora_parameters(model):
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())).to(p.device) * 0.01)
    return model.train()


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_policies_give_the_same_gradients(device):
    model = _model(device)
    ids = torch.randint(3, 1024, (2, 48), generator=torch.Generator().manual_seed(0)).to(device)
    loss0, g0 = _grads(model, ids, "off")
    for policy in ("keep", "full", "selective", "offload"):
        loss, g = _grads(model, ids, policy)
        assert loss == loss0
        for a, b in zip(g, g0):
            assert torch.equal(a, b), policy


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_split_recompute_repeats_dropout_masks(device):
    """selective/offload recompute each branch with the RNG as it was: the same masks, the same grads."""
    model = _model(device, dropout=0.1)
    ids = torch.randint(3, 1024, (2, 48), generator=torch.Generator().manual_seed(1)).to(device)
    torch.manual_seed(5)
    loss0, g0 = _grads(model, ids, "off")
    for policy in ("selective", "offload"):
        torch.manual_seed(5)
        loss, g = _grads(model, ids, policy)
        assert loss == loss0
        for a, b in zip(g, g0):
            assert torch.equal(a, b), policy


def test_split_recompute_skips_the_output_projections(monkeypatch):
    """In the recompute, o_proj and down_proj run backward-only: their frozen GEMM is not called."""
    import fourbit.lora as lora_mod
    model = _model("cpu")
    ids = torch.randint(3, 1024, (1, 32), generator=torch.Generator().manual_seed(2))
    calls = []
    orig = lora_mod.LoRALinear.base_forward

    def counting(self, x):
        calls.append(self)
        return orig(self, x)
    monkeypatch.setattr(lora_mod.LoRALinear, "base_forward", counting)
    layer = model.model.layers[0]
    finals = {layer.self_attn.o_proj, layer.mlp.down_proj}
    _grads(model, ids, "off")
    off = [m for m in calls if m in finals]
    calls.clear()
    _grads(model, ids, "selective")
    sel = [m for m in calls if m in finals]
    calls.clear()
    _grads(model, ids, "full")
    full = [m for m in calls if m in finals]
    assert len(off) == 2 and len(sel) == 2 and len(full) == 4      # full runs them again in backward


def test_remove_restores_the_layer_forward():
    model = build_random_model("tiny", "cpu")
    apply_checkpointing(model, "full")
    assert "forward" in model.model.layers[0].__dict__
    remove_checkpointing(model)
    assert "forward" not in model.model.layers[0].__dict__


def test_auto_is_the_memory_plans_to_resolve():
    """apply_checkpointing takes concrete policies only: `auto` is resolved by fourbit.plan (one memory model)."""
    model = _model("cpu")
    with pytest.raises(ValueError, match="memory plan"):
        apply_checkpointing(model, "auto")
    with pytest.raises(ValueError, match="one of"):
        apply_checkpointing(model, "sometimes")


def _loss_and_grads(model, ids, pos):
    for p in lora_parameters(model):
        p.grad = None
    logits = model(input_ids=ids, position_ids=pos).logits.float()
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    loss.backward()
    return logits.detach(), [p.grad.clone() for p in lora_parameters(model)]


@pytest.mark.parametrize("policy", ["off", "selective"])
def test_fused_rope_attention_matches_transformers(policy, monkeypatch):
    """fuse_layers' attention forward (q/k/v side by side -> one RoPE kernel -> the same attention
    interface) gives exactly the logits and LoRA gradients of transformers' attention forward (the
    same fused model with `Switches.rope` off) in fp32, with per-row positions (packed rows)."""
    import fourbit.kernels.rope as rope_mod
    from fourbit.switches import Switches
    from fourbit.train.activations import fuse_layers, unfuse_layers
    model = build_random_model("tiny", "cpu", quant="none").float()
    apply_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0, targets="all-linear"), seed=0)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.01)
    model.train()
    ids = torch.randint(3, 1024, (2, 40), generator=torch.Generator().manual_seed(3))
    pos = torch.cat([torch.arange(40)[None], torch.cat([torch.arange(15), torch.arange(25)])[None]])
    attn = model.model.layers[0].self_attn
    assert fuse_layers(model) > 0 and "forward" in attn.__dict__
    apply_checkpointing(model, policy, fuse=False)
    try:
        Switches.rope = False
        ref_logits, ref_g = _loss_and_grads(model, ids, pos)
        Switches.rope = True
        logits, g = _loss_and_grads(model, ids, pos)
    finally:
        Switches.rope = True
        unfuse_layers(model)
    assert "forward" not in attn.__dict__
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    for a, b in zip(g, ref_g):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    # and the fused path is the one that ran: with RoPE's sin negated, the logits move
    orig = rope_mod.rope_qkv
    monkeypatch.setattr(rope_mod, "rope_qkv", lambda qkv, cos, sin, *a: orig(qkv, cos, -sin, *a))
    fuse_layers(model)
    bad, _ = _loss_and_grads(model, ids, pos)
    remove_checkpointing(model)
    unfuse_layers(model)
    assert float((bad - ref_logits).norm() / ref_logits.norm()) > 1e-3


def test_keep_policy_marks_and_unmarks_the_lora_layers():
    """`keep` = `off` (no wrapped layers) with every LoRA linear told to keep its dequantized weight in a
    training forward; `remove_checkpointing` clears it; on CPU the loss and gradients equal `off`'s."""
    from fourbit.lora import LoRALinear
    from fourbit.train.activations import remove_checkpointing
    model = build_random_model("tiny", "cpu", quant="nf4")
    apply_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0, targets="all-linear"), seed=0)
    model.train()
    ids = torch.randint(3, 1024, (2, 24), generator=torch.Generator().manual_seed(0))
    apply_checkpointing(model, "off")                              # fuses the layers as every policy does
    ref = _loss_and_grads(model, ids, None)
    assert apply_checkpointing(model, "keep") == "keep"
    lins = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert lins and all(m.keeps_weight() for m in lins)
    assert all("forward" in layer.__dict__ for layer in model.model.layers)     # the fused add + norm forward
    got = _loss_and_grads(model, ids, None)
    model.eval()
    assert not any(m.keeps_weight() for m in lins)                 # inference: nothing to keep
    model.train()
    remove_checkpointing(model)
    assert not any(m.keeps_weight() for m in lins)
    assert not any("forward" in layer.__dict__ for layer in model.model.layers)
    torch.testing.assert_close(got[0], ref[0], rtol=0, atol=0)
    for a, b in zip(got[1], ref[1]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_policy_marks_whether_it_recomputes():
    """train.loss reads `_fourbit_recompute` to size the LM-head chunks: wide under off/keep, small when a
    policy recomputes to save memory (the plan makes the same choice); removal clears the mark."""
    model = _model("cpu")
    for policy, recompute in (("keep", False), ("off", False), ("selective", True), ("full", True), ("offload", True)):
        apply_checkpointing(model, policy)
        assert model.__dict__["_fourbit_recompute"] is recompute, policy
    remove_checkpointing(model)
    assert "_fourbit_recompute" not in model.__dict__

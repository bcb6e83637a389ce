"""Checkpointing policies: same loss and LoRA gradients as no checkpointing; auto picks by budget."""
import pytest
import torch

pytest.importorskip("bitsandbytes")

from fourbit.config import LoraConfig  # noqa: E402
from fourbit.lora import apply_lora, lora_parameters  # noqa: E402
from fourbit.shapes import build_random_model, shape_config  # noqa: E402
from fourbit.train.activations import apply_checkpointing, choose_policy, remove_checkpointing  # noqa: E402
from fourbit.train.loss import causal_lm_loss  # noqa: E402


def _grads(model, ids, policy):
    apply_checkpointing(model, policy, tokens=ids.numel())
    for p in lora_parameters(model):
        p.grad = None
    ls, n = causal_lm_loss(model, {"input_ids": ids, "labels": ids})
    (ls / n).backward()
    remove_checkpointing(model)
    return float(ls), [p.grad.clone() for p in lora_parameters(model)]


def _model(device):
    model = build_random_model("tiny", device, quant="nf4")
    apply_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0, targets="all-linear"), seed=0)
    with torch.no_grad():                      # nonzero B so every gradient is exercised
        for p in lora_parameters(model):
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())).to(p.device) * 0.01)
    return model.train()


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_policies_give_the_same_gradients(device):
    model = _model(device)
    ids = torch.randint(3, 1024, (2, 48), generator=torch.Generator().manual_seed(0)).to(device)
    loss0, g0 = _grads(model, ids, "off")
    for policy in ("full", "offload"):
        loss, g = _grads(model, ids, policy)
        assert loss == loss0
        for a, b in zip(g, g0):
            assert torch.equal(a, b), policy


def test_remove_restores_the_layer_forward():
    model = build_random_model("tiny", "cpu")
    apply_checkpointing(model, "full")
    assert "forward" in model.model.layers[0].__dict__
    remove_checkpointing(model)
    assert "forward" not in model.model.layers[0].__dict__


def test_choose_policy_by_budget():
    cfg = shape_config("llama3-8b")
    tokens, gib = 8192, 2 ** 30
    resident = int(6 * gib)
    assert choose_policy(cfg, tokens, 140 * gib, resident) == "off"
    assert choose_policy(cfg, tokens, 12 * gib, resident) == "full"
    assert choose_policy(cfg, tokens, 8 * gib, resident) == "offload"

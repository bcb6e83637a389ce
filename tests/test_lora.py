"""LoRALinear: zero-init equality, targets, parameter counts, PEFT file compatibility both ways."""
import json
import os

import pytest
import torch

from fourbit.config import LoraConfig, QuantConfig
from fourbit.errors import FourbitError
from fourbit.lora import (apply_lora, count_parameters, describe_parameters, load_adapter, lora_parameters,
                          match_targets, save_adapter)
from fourbit.model import load_base

CPU = torch.device("cpu")


def _ids(tok, n=2, t=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, len(tok), (n, t), generator=g)


def _randomize_b(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model):
            if p.shape[1] < p.shape[0] or True:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.mark.parametrize("bits", [4, None])
def test_untrained_lora_equals_base(tiny_model_dir, smol_tokenizer, bits):
    q = QuantConfig(bits=bits, compute_dtype="float32")
    base = load_base(tiny_model_dir, q, CPU)
    ids = _ids(smol_tokenizer)
    with torch.no_grad():
        ref = base(input_ids=ids).logits
    names = apply_lora(base, LoraConfig(r=4, alpha=8, dropout=0.0))
    assert len(names) == 2 * 7                       # 2 layers x (q, k, v, o, gate, up, down)
    with torch.no_grad():
        out = base(input_ids=ids).logits
    if bits is None:
        assert torch.equal(out, ref)                  # B = 0: exactly the base model
    else:
        # bitsandbytes' own CPU kernel (used by the unwrapped Linear4bit) rounds differently from
        # dequantize + matmul; measured max diff 3e-3 on logits of magnitude ~1.3
        assert (out - ref).abs().max() < 1e-2


def test_targets_by_name_and_error_lists_modules(tiny_model_dir):
    model = load_base(tiny_model_dir, QuantConfig(bits=None), CPU)
    names = match_targets(model, ["q_proj", "v_proj"])
    assert sorted(n.rsplit(".", 1)[-1] for n in names) == ["q_proj", "q_proj", "v_proj", "v_proj"]
    assert "lm_head" not in " ".join(match_targets(model, "all-linear"))
    with pytest.raises(FourbitError) as e:
        match_targets(model, ["query_key_value"])
    msg = str(e.value)
    assert "query_key_value" in msg and "q_proj" in msg and "down_proj" in msg


def test_parameter_counts_use_logical_4bit_size(tiny_model_dir):
    full = load_base(tiny_model_dir, QuantConfig(bits=None), CPU)
    q4 = load_base(tiny_model_dir, QuantConfig(bits=4), CPU)
    assert count_parameters(q4)[1] == count_parameters(full)[1]
    apply_lora(q4, LoraConfig(r=8, alpha=16))
    trainable, total = count_parameters(q4)
    # per layer: r * (in + out) for q,k,v,o,gate,up,down (hidden 64, kv 32, inter 128)
    per_layer = 8 * ((64 + 64) + (64 + 32) * 2 + (64 + 64) + (64 + 128) * 2 + (128 + 64))
    assert trainable == 2 * per_layer
    assert describe_parameters(q4).startswith(f"trainable {trainable / 1e3:.1f}K / ")


@pytest.mark.parametrize("bits,dtype,tol", [(None, "float32", 1e-5), (4, "float32", 1e-4), (4, "bfloat16", 0.05)])
def test_peft_loads_our_adapter_with_same_logits(tiny_model_dir, smol_tokenizer, tmp_path, bits, dtype, tol):
    peft = pytest.importorskip("peft")
    q = QuantConfig(bits=bits, compute_dtype=dtype)
    ours = load_base(tiny_model_dir, q, CPU)
    apply_lora(ours, LoraConfig(r=4, alpha=8, dropout=0.0), seed=3)
    _randomize_b(ours)
    save_adapter(ours, str(tmp_path / "adapter"), LoraConfig(r=4, alpha=8, dropout=0.0), tiny_model_dir)
    ids = _ids(smol_tokenizer)
    ours.eval()
    with torch.no_grad():
        a = ours(input_ids=ids).logits.float()
    base = load_base(tiny_model_dir, q, CPU)
    pm = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
    # train mode (dropout is 0): in eval mode bitsandbytes repacks CPU weights for its own fused kernel,
    # which rounds differently (~3e-3) from dequantize + matmul; this compares the LoRA math itself
    pm.train()
    with torch.no_grad():
        b = pm(input_ids=ids).logits.float()
    # the adapter really changes the model, and peft sees the same change
    with torch.no_grad():
        plain = load_base(tiny_model_dir, q, CPU)(input_ids=ids).logits.float()
    assert (a - plain).abs().max() > 10 * tol
    assert (a - b).abs().max() <= tol * max(1.0, float(a.abs().max()))


def test_we_load_peft_adapters(tiny_model_dir, smol_tokenizer, tmp_path):
    peft = pytest.importorskip("peft")
    q = QuantConfig(bits=None, compute_dtype="float32")
    base = load_base(tiny_model_dir, q, CPU)
    cfg = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0,
                          init_lora_weights=False)  # random B: a non-trivial adapter
    pm = peft.get_peft_model(base, cfg)
    pm.save_pretrained(str(tmp_path / "peft"))
    ids = _ids(smol_tokenizer)
    with torch.no_grad():
        ref = pm(input_ids=ids).logits
    ours = load_base(tiny_model_dir, q, CPU)
    acfg = load_adapter(ours, str(tmp_path / "peft"))
    assert acfg["r"] == 4
    with torch.no_grad():
        out = ours(input_ids=ids).logits
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5)


def test_adapter_files_are_peft_layout(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file
    model = load_base(tiny_model_dir, QuantConfig(bits=4), CPU)
    apply_lora(model, LoraConfig(r=4, alpha=8, targets=["q_proj"]))
    save_adapter(model, str(tmp_path), LoraConfig(r=4, alpha=8, targets=["q_proj"]), "base-model",
                 quant={"bits": 4, "type": "nf4"})
    cfg = json.load(open(tmp_path / "adapter_config.json"))
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8
    assert cfg["target_modules"] == ["q_proj"] and cfg["base_model_name_or_path"] == "base-model"
    assert "fourbit" not in cfg                        # PEFT warns about keys it does not know
    extras = json.load(open(tmp_path / "fourbit_adapter.json"))
    assert extras["quant"] == {"bits": 4, "type": "nf4"} and len(extras["modules"]) == 2
    keys = sorted(load_file(str(tmp_path / "adapter_model.safetensors")))
    assert keys == ["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
                    "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight",
                    "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight",
                    "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"]


def test_load_adapter_errors(tiny_model_dir, tmp_path):
    model = load_base(tiny_model_dir, QuantConfig(bits=None), CPU)
    with pytest.raises(FourbitError, match="adapter_config.json is missing"):
        load_adapter(model, str(tmp_path))
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
    with pytest.raises(FourbitError, match="not found"):
        load_adapter(model, str(tmp_path))
    (tmp_path / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")
    with pytest.raises(FourbitError, match="truncated or corrupt"):
        load_adapter(model, str(tmp_path))


def test_lora_backward_through_4bit_matches_dense(tiny_model_dir, smol_tokenizer):
    """The 4-bit autograd function gives the input gradient of the dequantized dense weight."""
    from fourbit.lora import LoRALinear, dequantize
    model = load_base(tiny_model_dir, QuantConfig(bits=4, compute_dtype="float32"), CPU)
    apply_lora(model, LoraConfig(r=4, alpha=8, targets=["gate_proj"], dropout=0.0))
    layer = model.model.layers[0].mlp.gate_proj
    assert isinstance(layer, LoRALinear)
    _randomize_b(model)
    x = torch.randn(3, 5, 64, requires_grad=True)
    layer(x).square().sum().backward()
    w = dequantize(layer.base_layer).detach().float()
    x2 = x.detach().clone().requires_grad_(True)
    a, b = layer.lora_A.weight.detach(), layer.lora_B.weight.detach()
    (x2 @ w.T + (x2 @ a.T) @ b.T * layer.scaling).square().sum().backward()
    assert torch.allclose(x.grad, x2.grad, atol=1e-4, rtol=1e-4)
    assert layer.lora_A.weight.grad is not None and layer.lora_B.weight.grad.abs().sum() > 0


def test_fast_dropout_rate_and_determinism():
    from fourbit.lora import FastDropout
    d = FastDropout(0.05)
    x = torch.ones(1000, 1000, dtype=torch.bfloat16)
    torch.manual_seed(0)
    y = d(x)
    assert abs(float((y == 0).float().mean()) - 0.05) < 0.002
    assert abs(float(y.float().mean()) - 1.0) < 0.005            # inverted dropout keeps the expectation
    torch.manual_seed(0)
    assert torch.equal(d(x), y)                                   # same seed, same mask (checkpoint recompute)
    d.eval()
    assert d(x) is x


def test_materialize_4bit_keeps_outputs(tiny_model_dir, smol_tokenizer):
    from fourbit.infer import materialize_4bit
    from fourbit.lora import is_4bit
    model = load_base(tiny_model_dir, QuantConfig(bits=4), CPU)
    apply_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0, targets="all-linear"))
    _randomize_b(model)
    model.eval()
    ids = _ids(smol_tokenizer)
    with torch.no_grad():
        ref = model(input_ids=ids).logits             # every base matmul through our dequantize + matmul
        assert materialize_4bit(model) == 14
        out = model(input_ids=ids).logits
    assert not any(is_4bit(m) for m in model.modules())
    assert torch.equal(out, ref)


def test_pickled_adapter_with_payload_is_refused(tiny_model_dir, tmp_path):
    import pickle
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
    with open(tmp_path / "adapter_model.bin", "wb") as f:
        pickle.dump({"w": Payload()}, f)
    model = load_base(tiny_model_dir, QuantConfig(bits=None), CPU)
    with pytest.raises(FourbitError) as e:
        load_adapter(model, str(tmp_path))
    assert "adapter_model.bin" in str(e.value)
    assert not marker.exists()

"""generate / chat: chat template, stopping at end-of-turn, run folders with their adapter."""
import os
import subprocess
import sys

import pytest
import torch

from fourbit.config import LoraConfig, QuantConfig
from fourbit.infer import generate_reply, load_for_inference, resolve_model_and_adapter, stop_ids


def _cli(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "fourbit", *args], input=stdin, capture_output=True, text=True,
                          timeout=600)


def test_stop_ids_include_end_of_turn(smol_tokenizer):
    ids = stop_ids(smol_tokenizer)
    assert smol_tokenizer.convert_tokens_to_ids("<|im_end|>") in ids
    assert smol_tokenizer.convert_tokens_to_ids("<|im_start|>") not in ids


def _fake_run(tmp_path, tiny_model_dir):
    """A run folder as `fourbit train` leaves it: config.yaml + adapter/ (4-bit, non-zero B)."""
    from fourbit.lora import apply_lora, lora_parameters, save_adapter
    from fourbit.model import load_base
    run = tmp_path / "run"
    model = load_base(tiny_model_dir, QuantConfig(bits=4), torch.device("cpu"))
    apply_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0))
    with torch.no_grad():
        for p in lora_parameters(model):
            p.add_(0.05)
    save_adapter(model, str(run / "adapter"), LoraConfig(r=4, alpha=8), tiny_model_dir,
                 quant={"bits": 4, "type": "nf4", "double_quant": True, "compute_dtype": "bfloat16", "blocksize": 64})
    (run / "config.yaml").write_text(f"model: {tiny_model_dir}\nquant: {{bits: 4}}\n")
    return str(run)


def test_run_folder_resolves_to_base_adapter_and_4bit(tmp_path, tiny_model_dir):
    run = _fake_run(tmp_path, tiny_model_dir)
    base, adapter, quant = resolve_model_and_adapter(run, None)
    assert base == tiny_model_dir and adapter == os.path.join(run, "adapter") and quant["bits"] == 4
    model, tok = load_for_inference(run)
    from fourbit.lora import LoRALinear
    assert sum(isinstance(m, LoRALinear) for m in model.modules()) == 14
    plain, _ = load_for_inference(tiny_model_dir, quant="4")
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert (model(input_ids=ids).logits - plain(input_ids=ids).logits).abs().max() > 1e-3   # adapter applied


def test_chat_cli_reset_and_exit(tmp_path, tiny_model_dir):
    r = _cli("chat", "--model", tiny_model_dir, "--max-new-tokens", "3", stdin="hello\n/reset\nhi again\n/exit\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("assistant> ") == 2 and "Traceback" not in r.stderr


@pytest.mark.slow
def test_generate_stops_at_end_of_turn(smollm2_dir):
    """The real SmolLM2 answers through its ChatML template and stops at <|im_end|>, not at max_new_tokens."""
    model, tok = load_for_inference(smollm2_dir, quant="none")
    reply = generate_reply(model, tok, [{"role": "user", "content": "What is the capital of France?"}],
                           max_new_tokens=60)
    assert "Paris" in reply and "<|im_end|>" not in reply and "<|im_start|>" not in reply
    assert len(tok(reply).input_ids) < 40                              # stopped by end-of-turn
    r = _cli("generate", "--model", smollm2_dir, "--quant", "none", "--prompt", "What is the capital of France?",
             "--max-new-tokens", "60")
    assert r.returncode == 0 and "Paris" in r.stdout, r.stderr

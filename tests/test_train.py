"""Training end to end on tiny random models: loss falls, accumulation is token-normalised, run files."""
import json
import os

import pytest
import torch

from fourbit.config import load_config
from fourbit.train.loop import prepare_run, run_training, train_step


def _data(tmp_path, rows, name="train.jsonl"):
    p = tmp_path / name
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(p)


def _chat(q, a):
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


def test_tiny_qlora_memorises(tmp_path, smol_tokenizer_dir, capsys):
    """A 4-bit tiny model learns a memorisable answer: loss falls by more than half, files are written."""
    from conftest import make_tiny_llama
    model = make_tiny_llama(tmp_path / "m", smol_tokenizer_dir, hidden=128, inter=256, layers=2, init_range=0.2)
    rows = [_chat(f"What is the secret word #{i % 4}?", "The secret word is swordfish.") for i in range(16)]
    train = _data(tmp_path, rows)
    out = tmp_path / "run"
    cfg = load_config(None, base={
        "model": model, "output": str(out),
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0},
        "data": {"train": train, "eval": train, "max_length": 64},
        "train": {"lr": 2e-2, "max_steps": 40, "micro_batch_size": 4, "grad_accum": 2, "log_every": 1,
                  "save_every": 0, "warmup_steps": 2, "device": "cpu", "grad_checkpointing": True},
    })
    run_training(cfg)
    recs = [json.loads(line) for line in open(out / "metrics.jsonl")]
    steps = [r for r in recs if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 41))
    for key in ("step", "loss", "grad_norm", "lr", "tokens", "tokens_per_s"):
        assert key in steps[0]
    assert steps[-1]["loss"] < 0.5 * steps[0]["loss"], (steps[0]["loss"], steps[-1]["loss"])
    assert any("eval_loss" in r for r in recs)
    assert (out / "adapter" / "adapter_model.safetensors").exists() and (out / "config.yaml").exists()
    text = capsys.readouterr().out
    assert "trainable" in text and "LoRA on 14 modules" in text


def _grads_after_one_step(cfg):
    run = prepare_run(cfg)
    # plain SGD with lr 1: the parameter change after one step is exactly minus the accumulated gradient
    # (Adam's first step, ~lr * sign(g), would hide the gradient's size)
    run.optimizer = torch.optim.SGD(run.params, lr=1.0)
    before = torch.cat([p.detach().flatten() for p in run.params]).clone()
    m = train_step(run, 0)
    return m, before - torch.cat([p.detach().flatten() for p in run.params])


def test_accumulation_normalises_by_trainable_tokens(tmp_path, tiny_model_dir):
    """micro 4 x accum 1, micro 1 x accum 4 and micro 2 x accum 2 give the same update on rows of very
    different lengths (per-micro-batch averaging would weight short rows more)."""
    rows = [_chat("Hi", "Yes."), _chat("Tell me a long story please", "Once upon a time " * 8),
            _chat("Count", "one two three four five six"), _chat("Why?", "Because.")]
    train = _data(tmp_path, rows)
    results = []
    for micro, accum in ((4, 1), (1, 4), (2, 2)):
        cfg = load_config(None, base={
            "model": tiny_model_dir, "output": str(tmp_path / f"r{micro}"),
            "quant": {"bits": None, "compute_dtype": "float32"},
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
            "data": {"train": train, "max_length": 128, "shuffle": False},
            "train": {"lr": 1e-2, "max_steps": 1, "micro_batch_size": micro, "grad_accum": accum,
                      "warmup_steps": 0, "device": "cpu", "optimizer": "adamw_torch", "max_grad_norm": 0.0,
                      "grad_checkpointing": False},
        })
        results.append(_grads_after_one_step(cfg))
    (m0, p0), (m1, p1), (m2, p2) = results
    assert abs(m0["loss"] - m1["loss"]) < 1e-5 and abs(m0["loss"] - m2["loss"]) < 1e-5
    assert abs(m0["grad_norm"] - m1["grad_norm"]) < 1e-5 * max(1.0, m0["grad_norm"])
    assert p0.abs().max() > 1e-3                                   # a real gradient
    assert torch.allclose(p0, p1, atol=1e-6, rtol=1e-4) and torch.allclose(p0, p2, atol=1e-6, rtol=1e-4)


@pytest.mark.slow
def test_real_smollm2_trains(tmp_path, smollm2_dir):
    """The real SmolLM2-135M in 4-bit: a few steps on the bundled dataset lower the loss."""
    root = os.path.join(os.path.dirname(__file__), "..")
    cfg = load_config(os.path.join(root, "examples", "quickstart.yaml"), [
        f"--model={smollm2_dir}", f"--output={tmp_path / 'run'}", f"--data.train={root}/examples/data/train.jsonl",
        "--data.eval=none", "--train.max_steps=6", "--train.log_every=1", "--train.micro_batch_size=4",
        "--train.lr=1e-3", "--train.warmup_steps=0"])
    run_training(cfg)
    recs = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl") if "loss" in line]
    assert len(recs) == 6 and recs[-1]["loss"] < recs[0]["loss"]

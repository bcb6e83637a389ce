"""Guards of the training loop: preemption by real signals, non-finite steps, out of memory.

The signal tests run `python -m fourbit train` as a subprocess on a tiny random Llama and signal it
once metrics.jsonl shows progress. NaN and OOM are injected through the test-only seams of
`fourbit.train.guards` (FOURBIT_TEST_NAN_STEPS, FOURBIT_TEST_OOM_ABOVE).
"""
import copy
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from fourbit.config import load_config
from fourbit.errors import FourbitError
from fourbit.lora import adapter_state_dict
from fourbit.train import guards
from fourbit.train.checkpoint import find_resumable, load_checkpoint
from fourbit.train.loop import prepare_run, run_training, train_step


def write_data(path, rows=14):
    with open(path, "w", encoding="utf-8") as f:
        for i in range(rows):
            msgs = [{"role": "user", "content": f"What is {i} times {i}?"},
                    {"role": "assistant", "content": f"{i} times {i} is {i * i}."}]
            f.write(json.dumps({"messages": msgs}) + "\n")
    return str(path)


def cfg_dict(model, data, out, **train):
    t = {"micro_batch_size": 2, "grad_accum": 2, "max_steps": 6, "log_every": 1, "save_every": 100,
         "optimizer": "adamw_torch", "threads": 1, "lr": 1e-3, "warmup_steps": 1}
    t.update(train)
    return {"model": model, "output": str(out), "lora": {"r": 4, "alpha": 8, "dropout": 0.1},
            "data": {"train": data, "max_length": 64}, "train": t}


def records(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture
def env(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("FOURBIT_CACHE", str(tmp_path / "cache"))
    return {"model": tiny_model_dir, "data": write_data(tmp_path / "train.jsonl"), "tmp": tmp_path}


# ---------------------------------------------------------------- preemption (real signals, real subprocess)

def _start(cfg_path, log_path, *args):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.Popen([sys.executable, "-m", "fourbit", "train", str(cfg_path), *args],
                            stdout=open(log_path, "w"), stderr=subprocess.STDOUT, env=env)


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_signal_finishes_step_checkpoints_and_resumes(env, sig, code):
    out = env["tmp"] / "run"
    steps = 30
    cfg_path = env["tmp"] / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg_dict(env["model"], env["data"], out, max_steps=steps, grad_accum=1,
                                                save_every=1000)))
    proc = _start(cfg_path, env["tmp"] / "log1.txt")
    metrics, deadline = out / "metrics.jsonl", time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, (env["tmp"] / "log1.txt").read_text()[-2000:]
    proc.send_signal(sig)
    assert proc.wait(timeout=120) == code, (env["tmp"] / "log1.txt").read_text()[-2000:]
    log = (env["tmp"] / "log1.txt").read_text()
    assert f"{sig.name} received" in log and "--resume" in log

    ck = load_checkpoint(find_resumable(str(out), auto=False))          # complete and verified
    assert 2 <= ck.state.step < steps and ck.state.extra["plan_step"] == ck.state.step
    assert max(r["step"] for r in records(out)) == ck.state.step        # the step in flight was finished, logged
    assert not (out / "adapter").exists()
    if sig == signal.SIGINT:
        return
    proc = _start(cfg_path, env["tmp"] / "log2.txt", "--resume")
    assert proc.wait(timeout=300) == 0, (env["tmp"] / "log2.txt").read_text()[-2000:]
    assert [r["step"] for r in records(out) if "loss" in r] == list(range(1, steps + 1))
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


# ---------------------------------------------------------------- non-finite steps

def _snapshot(run):
    return (copy.deepcopy({k: v.clone() for k, v in adapter_state_dict(run.model).items()}),
            copy.deepcopy(run.optimizer.state_dict()), copy.deepcopy(run.scheduler.state_dict()))


def _same(a, b):
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def test_non_finite_step_changes_nothing(env, monkeypatch):
    run = prepare_run(load_config(base=cfg_dict(env["model"], env["data"], env["tmp"] / "run")))
    monkeypatch.setenv("FOURBIT_TEST_NAN_STEPS", "2")
    m = train_step(run, 0)
    assert "skipped" not in m and m["loss"] > 0
    before = _snapshot(run)
    m = train_step(run, 1)                                               # poisoned: loss and gradients NaN
    assert m["skipped"] == "non-finite loss or gradient" and m["loss"] != m["loss"]
    assert _same(_snapshot(run), before)                                 # weights, optimizer, scheduler
    assert run.scheduler.last_epoch == 1 and all(p.grad is None for p in run.params)
    m = train_step(run, 2)
    assert "skipped" not in m and not _same(_snapshot(run)[0], before[0])


def test_bad_steps_skipped_then_run_continues(env, monkeypatch, capsys):
    monkeypatch.setenv("FOURBIT_TEST_NAN_STEPS", "2")
    out = env["tmp"] / "run"
    run_training(load_config(base=cfg_dict(env["model"], env["data"], out, max_steps=4, warmup_steps=3)))
    err = capsys.readouterr().out
    assert "warning: batch 2 (epoch 0, training rows" in err and "stay at step 1" in err
    recs = records(str(out))
    assert [(r["step"], r["batch"], r.get("skipped")) for r in recs] == [
        (1, 1, None), (1, 2, "non-finite loss or gradient"), (2, 3, None), (3, 4, None)]
    assert recs[1]["loss"] is None                                        # NaN is not JSON: null
    # warmup 1/3, 2/3, 1 of lr 1e-3: the skipped batch did not advance the schedule
    assert [r.get("lr") for r in recs] == pytest.approx([1e-3 / 3, None, 2e-3 / 3, 1e-3])
    ck = load_checkpoint(find_resumable(str(out), auto=False))
    assert (ck.state.step, ck.state.bad_steps, ck.state.extra["plan_step"]) == (3, 1, 4)
    assert ck.scheduler_state["last_epoch"] == 3


def test_too_many_bad_steps_stop_with_last_good_checkpoint(env, monkeypatch):
    monkeypatch.setenv("FOURBIT_TEST_NAN_STEPS", "2,3,4")
    out = env["tmp"] / "run"
    cfg = load_config(base=cfg_dict(env["model"], env["data"], out, max_steps=6, save_every=1, max_bad_steps=3))
    with pytest.raises(FourbitError, match=r"3 optimizer steps in a row \(batches 2 to 4\).*none of them was "
                                           r"applied\. The last good checkpoint is `.*step-1`"):
        run_training(cfg)
    assert not (out / "adapter").exists()
    ck = load_checkpoint(find_resumable(str(out), auto=False))
    assert ck.state.step == 1 and sorted(os.listdir(out / "checkpoints")) == ["latest", "step-1"]


# ---------------------------------------------------------------- out of memory

def test_oom_decision(env, capsys):
    cfg = load_config(base=cfg_dict(env["model"], env["data"], env["tmp"] / "run", micro_batch_size=4,
                                    grad_accum=2, grad_checkpointing=False))
    cpu = torch.device("cpu")
    with pytest.raises(FourbitError) as e:
        guards.after_oom(cfg, cpu, 4, pos=6, error="CUDA out of memory. Tried to allocate 96.00 MiB. GPU 0 has ...")
    msg = str(e.value)
    for part in ("Out of memory in optimizer step 7", "micro-batches of 4 rows of up to 64 tokens; it tried to "
                 "allocate 96.00 MiB more.",
                 "--train.micro_batch_size=2 --train.grad_accum=4", "train.auto_micro_batch: true",
                 "data.max_length (now 64", "train.grad_checkpointing: true", "fourbit plan"):
        assert part in msg, (part, msg)
    assert "packing" not in msg
    cfg.data.packing, cfg.train.grad_checkpointing, cfg.train.auto_micro_batch = True, True, True
    assert guards.after_oom(cfg, cpu, 4, pos=0) == 2
    assert "micro-batches of 2 rows and 4 accumulation steps (was 4 x 2), the same effective batch of 8" \
        in capsys.readouterr().err
    assert guards.after_oom(cfg, cpu, 2, pos=0) == 1
    with pytest.raises(FourbitError, match="Out of memory even at micro-batch 1.*data.packing: false") as e:
        guards.after_oom(cfg, cpu, 1, pos=0)
    assert "grad_checkpointing" not in str(e.value)


def test_auto_micro_batch_keeps_the_effective_batch(env, monkeypatch, capsys):
    base = dict(micro_batch_size=4, grad_accum=1, max_steps=3)
    ref = env["tmp"] / "ref"
    run_training(load_config(base=cfg_dict(env["model"], env["data"], ref, **base)))
    monkeypatch.setenv("FOURBIT_TEST_OOM_ABOVE", "1")                   # a micro-batch of 2+ rows 'runs out'
    with pytest.raises(FourbitError, match="Out of memory in optimizer step 1"):
        run_training(load_config(base=cfg_dict(env["model"], env["data"], env["tmp"] / "plain", **base)))
    out = env["tmp"] / "auto"
    run_training(load_config(base=cfg_dict(env["model"], env["data"], out, auto_micro_batch=True, **base)))
    err = capsys.readouterr().err
    assert "continuing with micro-batches of 2 rows and 2 accumulation steps" in err
    assert "continuing with micro-batches of 1 rows and 4 accumulation steps" in err
    a, b = records(str(out)), records(str(ref))
    assert [r["tokens"] for r in a] == [r["tokens"] for r in b]          # same rows in every step
    diff = max(abs(x["loss"] - y["loss"]) for x, y in zip(a, b))
    assert diff < 2e-3, diff                                              # bf16 sums in another order
    ck = load_checkpoint(find_resumable(str(out), auto=False))
    assert ck.state.extra["micro_batch_size"] == 1

"""Exact resume: a run stopped by a signal (inside a gradient-accumulation group, mid-epoch, at an
epoch boundary) and resumed gives the per-step losses and the final adapter of an uninterrupted run.

Tiny random Llama, LoRA dropout 0.1 (so the RNG states matter), 4-bit NF4 on CPU and 16-bit.
The plan: 14 rows, micro-batch 2, grad_accum 3 -> 7 micro-batches = groups of 3, 3, 1 per epoch,
3 optimizer steps per epoch, 8 steps = epochs 0, 1 and 2/3 of epoch 2.
"""
import json
import os
import shutil

import pytest

from fourbit.config import load_config
from fourbit.errors import FourbitError
from fourbit.train.checkpoint import REQUIRED_FILES, find_resumable, load_checkpoint
from fourbit.train.loop import run_training

STEPS = 8
ROWS = 14


def write_data(path, rows=ROWS, extra=""):
    with open(path, "w", encoding="utf-8") as f:
        for i in range(rows):
            msgs = [{"role": "user", "content": f"What is {i} plus {i}?{extra}"},
                    {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]
            f.write(json.dumps({"messages": msgs}) + "\n")
    return str(path)


def make_cfg(model, data, out, quant=True, **train):
    t = {"micro_batch_size": 2, "grad_accum": 3, "max_steps": STEPS, "log_every": 1, "save_every": 100,
         "optimizer": "paged_adamw_32bit" if quant else "adamw_torch", "threads": 1, "warmup_steps": 2,
         "seed": 3, "lr": 1e-3}
    t.update(train)
    base = {"model": model, "output": str(out), "lora": {"r": 4, "alpha": 8, "dropout": 0.1},
            "data": {"train": data, "max_length": 64}, "train": t}
    if not quant:
        base["quant"] = {"bits": None}
    return load_config(base=base)


def losses(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        recs = [json.loads(line) for line in f]
    return {r["step"]: r for r in recs if "loss" in r}


def adapter_bytes(out):
    with open(os.path.join(out, "adapter", "adapter_model.safetensors"), "rb") as f:
        return f.read()


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("resume")
    old = os.environ.get("FOURBIT_CACHE")
    os.environ["FOURBIT_CACHE"] = str(root / "cache")
    yield {"root": root, "model": tiny_model_dir, "data": write_data(root / "train.jsonl")}
    os.environ.pop("FOURBIT_TEST_SIGNAL_AT", None)
    if old is None:
        os.environ.pop("FOURBIT_CACHE", None)
    else:
        os.environ["FOURBIT_CACHE"] = old


@pytest.fixture(scope="module")
def reference(env):
    """Uninterrupted runs, one per quant mode; the NF4 one keeps its last 3 checkpoints."""
    refs = {}
    for quant in (True, False):
        out = env["root"] / f"ref-{quant}"
        run_training(make_cfg(env["model"], env["data"], out, quant, save_every=1, keep_checkpoints=3))
        refs[quant] = str(out)
    return refs


def stop_and_resume(env, out, quant, signal_at, monkeypatch):
    monkeypatch.setenv("FOURBIT_TEST_SIGNAL_AT", signal_at)
    with pytest.raises(SystemExit) as e:
        run_training(make_cfg(env["model"], env["data"], out, quant))
    assert e.value.code == 143
    monkeypatch.delenv("FOURBIT_TEST_SIGNAL_AT")
    ck = load_checkpoint(find_resumable(str(out), auto=False))
    run_training(make_cfg(env["model"], env["data"], out, quant), resume=True)
    return ck


def assert_same_run(out, ref):
    a, b = losses(out), losses(ref)
    assert sorted(a) == list(range(1, STEPS + 1)) and sorted(b) == sorted(a)
    diff = max(abs(a[s]["loss"] - b[s]["loss"]) for s in a)
    assert diff <= 1e-6, diff
    assert all(a[s]["lr"] == b[s]["lr"] and a[s]["tokens"] == b[s]["tokens"] and a[s]["batch"] == s for s in a)
    assert adapter_bytes(out) == adapter_bytes(ref)
    return diff


# signal spec STEP:MICRO (1-based step, 0-based micro-batch) -> where the checkpoint lands
STOPS = {
    "2:1": (2, 0, 6),   # mid-group of step 2: checkpoint mid-epoch 0, the next group is the epoch's partial one
    "3:0": (3, 1, 0),   # during the 1-micro-batch group closing epoch 0: checkpoint exactly at the epoch boundary
    "5:2": (5, 1, 6),   # last micro-batch of step 5: checkpoint mid-epoch 1
}


@pytest.mark.parametrize("quant,stops", [(True, ["2:1", "3:0", "5:2"]), (False, ["2:1"])], ids=["nf4", "bf16"])
def test_stop_anywhere_and_resume_exactly(env, reference, quant, stops, monkeypatch, capsys, recwarn):
    for spec in stops:
        out = env["root"] / f"stop-{quant}-{spec.replace(':', '_')}"
        ck = stop_and_resume(env, out, quant, spec, monkeypatch)
        step, epoch, in_epoch = STOPS[spec]
        assert (ck.state.step, ck.state.epoch, ck.state.batch_in_epoch) == (step, epoch, in_epoch)
        assert ck.state.extra["plan_step"] == step and ck.state.micro_step == {2: 6, 3: 7, 5: 13}[step]
        diff = assert_same_run(str(out), reference[quant])
        with capsys.disabled():
            print(f"\nresume {'nf4' if quant else 'bf16'} at {spec}: max |loss diff| = {diff:.2e}")
    assert not [w for w in recwarn if "Paged optimizers" in str(w.message)]  # the loop's one note is enough


def test_checkpoint_contents_and_pruning(reference):
    root = os.path.join(reference[True], "checkpoints")
    assert sorted(n for n in os.listdir(root) if n.startswith("step-")) == ["step-6", "step-7", "step-8"]
    assert open(os.path.join(root, "latest")).read().strip() == "step-8"
    assert set(REQUIRED_FILES) <= set(os.listdir(os.path.join(root, "step-8")))
    ck = load_checkpoint(os.path.join(root, "step-8"))
    assert ck.state.step == STEPS and ck.state.epoch == 2 and ck.config["train"]["max_steps"] == STEPS
    assert ck.fingerprint["hparams"]["lora.dropout"] == 0.1 and ck.fingerprint["data"][0]["name"] == "train.jsonl"
    assert set(ck.optimizer_state) == {"state", "param_groups"} and ck.scheduler_state["last_epoch"] == STEPS
    assert os.path.isfile(os.path.join(reference[True], "adapter", "adapter_config.json"))
    assert not os.path.exists(os.path.join(root, "step-8", "adapter"))


def test_broken_newest_checkpoint(env, reference, monkeypatch):
    out = env["root"] / "broken"
    shutil.copytree(reference[True], out)
    shutil.rmtree(out / "adapter")
    with open(out / "checkpoints" / "step-8" / "optimizer.pt", "r+b") as f:
        f.truncate(100)
    cfg = make_cfg(env["model"], env["data"], out, True)
    with pytest.raises(FourbitError, match="optimizer.pt.*truncated"):
        run_training(cfg, resume=True)                              # --resume: names the damaged file
    cfg.train.resume = "auto"
    with pytest.warns(UserWarning, match="instead of a newer checkpoint"):
        run_training(cfg)                                           # auto: previous complete one, with a warning
    assert_same_run(str(out), reference[True])


def test_changed_run_refused_unless_force(env, reference, tmp_path, smol_tokenizer_dir):
    from conftest import make_tiny_llama

    def attempt(name, data=env["data"], model=env["model"], force=False, **kw):
        out = tmp_path / name
        shutil.copytree(reference[False], out)
        with open(out / "checkpoints" / "latest", "w") as f:
            f.write("step-6\n")                                   # resume from step 6 of 8
        run_training(make_cfg(model, data, out, False, **kw), resume=True, force=force)
        return str(out)

    with pytest.raises(FourbitError, match=r"training data file `train.jsonl` differs.*--force"):
        attempt("data", data=write_data(tmp_path / "train.jsonl", extra=" Be brief."))
    with pytest.raises(FourbitError, match=r"`train.lr` changed from 0.001 to 0.002"):
        attempt("lr", lr=2e-3)
    other = make_tiny_llama(tmp_path / "other-model", smol_tokenizer_dir, seed=1)
    with pytest.raises(FourbitError, match="model weights differ"):
        attempt("model", model=other)
    with pytest.warns(UserWarning, match="--force although the run changed"):
        out = attempt("forced", force=True, lr=2e-3)
    a, b = losses(out), losses(reference[False])
    assert [a[s]["loss"] for s in range(1, 7)] == [b[s]["loss"] for s in range(1, 7)]
    assert a[7]["lr"] == pytest.approx(2 * b[7]["lr"]) and a[8]["lr"] == pytest.approx(2 * b[8]["lr"])  # new lr applies


def test_resume_modes(env, tmp_path, capsys):
    cfg = make_cfg(env["model"], env["data"], tmp_path / "run", False, max_steps=2, save_every=1)
    with pytest.raises(FourbitError, match="Nothing to resume"):
        run_training(cfg, resume=True)                              # --resume needs a checkpoint
    cfg.train.resume = "auto"
    run_training(cfg)                                               # auto without a checkpoint: a fresh run
    first = adapter_bytes(cfg.output)
    assert sorted(losses(cfg.output)) == [1, 2]
    run_training(cfg)                                               # auto on a finished run: nothing to do
    assert "already complete" in capsys.readouterr().out
    assert adapter_bytes(cfg.output) == first and sorted(losses(cfg.output)) == [1, 2]
    cfg.train.resume = "never"
    run_training(cfg)                                               # never: starts over, says so
    assert "holds checkpoints of an earlier run" in capsys.readouterr().err
    assert sorted(losses(cfg.output)) == [1, 2] and adapter_bytes(cfg.output) == first

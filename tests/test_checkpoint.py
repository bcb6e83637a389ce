"""fourbit.train.checkpoint: exact round trips, atomic saves under kill -9, broken and changed runs refused."""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from fourbit.config import load_config, to_dict
from fourbit.errors import FourbitError
from fourbit.train.checkpoint import (TrainerState, capture_rng, check_compatible, find_resumable, fingerprint,
                                      key_hparams, load_checkpoint, prune_checkpoints, restore_rng, save_checkpoint)


def _model(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))


def _make_opt(kind, model):
    if kind == "paged_adamw_32bit":
        import bitsandbytes as bnb
        return bnb.optim.PagedAdamW32bit(model.parameters(), lr=1e-2, weight_decay=0.01)
    return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)


def _lr_lambda(step):
    return min(1.0, (step + 1) / 3) * 0.9 ** step


def _train_steps(model, opt, sched, steps, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = torch.randn(4, 16, generator=g), torch.randn(4, 8, generator=g)
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


def _save(run, step, keep=0, model=None, fp=None, **kw):
    model = model or _model(step)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda)
    return save_checkpoint(str(run), TrainerState(step=step, epoch=0, batch_in_epoch=step * 4), model.state_dict(),
                           {"r": 8}, opt.state_dict(), sched.state_dict(), {"train": {"lr": 1e-3}},
                           fp or {"hparams": {}}, keep=keep, **kw)


@pytest.mark.filterwarnings("ignore:Paged optimizers are not supported on CPU")
@pytest.mark.parametrize("kind", ["paged_adamw_32bit", "adamw_torch"])
def test_round_trip_continues_bit_identically(tmp_path, kind):
    model = _model(0)
    opt = _make_opt(kind, model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda)
    _train_steps(model, opt, sched, 3, seed=1)
    state = TrainerState(step=3, epoch=1, batch_in_epoch=5, micro_step=12, tokens_seen=999, bad_steps=1,
                         extra={"best_eval": 1.25})
    cfg = {"model": "m", "lora": {"targets": ("q_proj", "v_proj")}, "train": {"lr": 0.01}}
    path = save_checkpoint(str(tmp_path), state, model.state_dict(), {"r": 8, "target_modules": ["q_proj"]},
                           opt.state_dict(), sched.state_dict(), cfg, {"model": "m", "hparams": {"lr": 0.01}})
    assert path == os.path.join(str(tmp_path), "checkpoints", "step-3")
    assert open(os.path.join(tmp_path, "checkpoints", "latest")).read().strip() == "step-3"

    ck = load_checkpoint(path)
    assert ck.state == state
    assert ck.config == {"model": "m", "lora": {"targets": ["q_proj", "v_proj"]}, "train": {"lr": 0.01}}
    assert ck.adapter_config["target_modules"] == ["q_proj"] and ck.fingerprint["hparams"] == {"lr": 0.01}
    model2 = _model(123)  # different init: everything must come from the checkpoint
    model2.load_state_dict(ck.adapter)
    opt2 = _make_opt(kind, model2)
    # order matters: building a scheduler writes lr into the optimizer, so load the states after both exist
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, _lr_lambda)
    opt2.load_state_dict(ck.optimizer_state)
    sched2.load_state_dict(ck.scheduler_state)
    assert sched2.get_last_lr() == sched.get_last_lr() and sched2.last_epoch == 3

    _train_steps(model, opt, sched, 3, seed=2)
    _train_steps(model2, opt2, sched2, 3, seed=2)
    for (n, a), b in zip(model.named_parameters(), model2.parameters()):
        assert torch.equal(a, b), n
    assert sched2.get_last_lr() == sched.get_last_lr()
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    for k in s1:
        for name, v in s1[k].items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(v, s2[k][name]), (k, name)


def test_rng_capture_restore_and_file_round_trip(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.gauss(0, 1), np.random.standard_normal()  # leave cached gaussians in the states
    saved = capture_rng()

    def draw():
        return random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), np.random.standard_normal(), \
            torch.rand(3).tolist()
    first = draw()
    restore_rng(saved)
    assert draw() == first
    path = _save(tmp_path, 1, rng=saved)
    draw()
    restore_rng(load_checkpoint(path).rng)  # loaded with weights_only=True
    assert draw() == first


def test_missing_file_and_truncated_file_are_named(tmp_path):
    p1 = _save(tmp_path, 1)
    p2 = _save(tmp_path, 2)
    opt_file = os.path.join(p2, "optimizer.pt")
    with open(opt_file, "r+b") as f:
        f.truncate(os.path.getsize(opt_file) // 2)
    for call in (lambda: load_checkpoint(p2), lambda: find_resumable(str(tmp_path), auto=False)):
        with pytest.raises(FourbitError) as e:
            call()
        assert opt_file in str(e.value) and "truncated" in str(e.value)
    with pytest.warns(UserWarning, match="optimizer.pt"):
        assert find_resumable(str(tmp_path), auto=True) == p1

    os.remove(os.path.join(p1, "rng.pt"))
    with pytest.raises(FourbitError, match=r"rng\.pt.*missing"):
        load_checkpoint(p1)
    with pytest.raises(FourbitError, match="No complete checkpoint"):
        find_resumable(str(tmp_path), auto=True)


def test_same_size_corruption_and_hostile_manifest(tmp_path):
    p = _save(tmp_path, 1)
    f = os.path.join(p, "adapter_model.safetensors")
    data = bytearray(open(f, "rb").read())
    data[-1] ^= 0xFF
    open(f, "wb").write(bytes(data))
    with pytest.raises(FourbitError, match="adapter_model.safetensors.*corrupt"):
        load_checkpoint(p)
    p2 = _save(tmp_path, 2)
    man = json.load(open(os.path.join(p2, "manifest.json")))
    man["files"]["../../escape"] = {"size": 1, "sha256": "0"}
    json.dump(man, open(os.path.join(p2, "manifest.json"), "w"))
    with pytest.raises(FourbitError, match=r"\.\./\.\./escape"):
        load_checkpoint(p2)


def test_malicious_optimizer_state_is_refused(tmp_path):
    """Even with a manifest rewritten to match, a pickle carrying code is never run."""
    import hashlib
    marker = tmp_path / "PWNED"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))
    p = _save(tmp_path / "run", 1)
    opt_file = os.path.join(p, "optimizer.pt")
    torch.save({"state": {}, "param_groups": [], "x": Evil()}, opt_file)
    man = json.load(open(os.path.join(p, "manifest.json")))
    man["files"]["optimizer.pt"] = {"size": os.path.getsize(opt_file),
                                    "sha256": hashlib.sha256(open(opt_file, "rb").read()).hexdigest()}
    json.dump(man, open(os.path.join(p, "manifest.json"), "w"))
    with pytest.raises(FourbitError) as e:
        load_checkpoint(p)
    assert opt_file in str(e.value) and "pickled code" in str(e.value) and "GLOBAL" in str(e.value)
    assert not marker.exists()


def test_latest_pointer_rules(tmp_path):
    assert find_resumable(str(tmp_path), auto=False) is None
    p1 = _save(tmp_path, 1)
    root = os.path.join(tmp_path, "checkpoints")
    os.makedirs(os.path.join(root, "step-9"))  # a folder without manifest newer than `latest`: never picked
    assert find_resumable(str(tmp_path), auto=False) == p1
    os.remove(os.path.join(root, "latest"))  # without a pointer every step-N counts; step-9 is broken
    with pytest.raises(FourbitError, match=r"step-9.*manifest\.json.*missing"):
        find_resumable(str(tmp_path), auto=False)
    with pytest.warns(UserWarning, match="step-9"):
        assert find_resumable(str(tmp_path), auto=True) == p1
    with open(os.path.join(root, "latest"), "w") as f:
        f.write("step-5\n")  # points at a folder that is gone
    with pytest.raises(FourbitError, match="step-5"):
        find_resumable(str(tmp_path), auto=False)
    with pytest.warns(UserWarning, match="step-5"):
        assert find_resumable(str(tmp_path), auto=True) == p1
    with open(os.path.join(root, "latest"), "w") as f:
        f.write("../../etc\n")
    with pytest.raises(FourbitError, match="instead of a checkpoint name"):
        find_resumable(str(tmp_path), auto=False)


def test_resave_same_step_replaces_it(tmp_path):
    _save(tmp_path, 1)
    p = _save(tmp_path, 1, model=_model(77))
    assert torch.equal(load_checkpoint(p).adapter["0.weight"], _model(77)[0].weight)
    assert sorted(os.listdir(os.path.join(tmp_path, "checkpoints"))) == ["latest", "step-1"]


def test_prune_keeps_newest_complete(tmp_path):
    for s in range(1, 6):
        _save(tmp_path, s, keep=2)
    root = os.path.join(tmp_path, "checkpoints")
    assert sorted(os.listdir(root)) == ["latest", "step-4", "step-5"]
    # the newest folder goes bad: the newest *complete* one (step-4) must survive any pruning
    os.remove(os.path.join(root, "step-5", "optimizer.pt"))
    assert prune_checkpoints(str(tmp_path), keep=1) == []
    assert sorted(os.listdir(root)) == ["latest", "step-4", "step-5"]
    _save(tmp_path, 6, keep=1)
    assert sorted(os.listdir(root)) == ["latest", "step-6"]
    # a checkpoint newer than the one being saved (an abandoned timeline) is left alone
    _save(tmp_path, 9)
    _save(tmp_path, 7, keep=1)
    assert sorted(os.listdir(root)) == ["latest", "step-7", "step-9"]
    assert find_resumable(str(tmp_path), auto=False).endswith("step-7")


_CHILD = r"""
import sys, torch
from fourbit.train.checkpoint import TrainerState, save_checkpoint
torch.manual_seed(0)
adapter = {f"layer{i}.lora_A.weight": torch.randn(256, 256) for i in range(8)}
opt = {"state": {i: {"step": 2, "exp_avg": torch.randn(256, 256)} for i in range(8)}, "param_groups": [{"lr": 0.1}]}
save_checkpoint(sys.argv[1], TrainerState(step=2), adapter, {"r": 8}, opt, {"last_epoch": 2}, {"a": 1}, {})
print("finished")
"""


@pytest.mark.parametrize("phase", ["writing_files", "manifest_written", "renamed_before_latest"])
def test_kill_9_mid_save_leaves_resumable_run(tmp_path, phase):
    run = tmp_path / "run"
    p1 = _save(run, 1)
    root = os.path.join(run, "checkpoints")
    env = dict(os.environ, FOURBIT_TEST_SLOW_SAVE="0.4")
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(run)], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)

    def reached():
        tmps = [n for n in os.listdir(root) if n.startswith(".tmp-step-2")]
        files = os.listdir(os.path.join(root, tmps[0])) if tmps else []
        if phase == "writing_files":
            return len(files) >= 3
        if phase == "manifest_written":
            return "manifest.json" in files
        return os.path.isdir(os.path.join(root, "step-2"))
    deadline = time.time() + 120
    try:
        while not reached():
            assert child.poll() is None, child.communicate()
            assert time.time() < deadline, "the save never reached the phase"
            time.sleep(0.01)
    except FileNotFoundError:  # the tmp folder was renamed between listdir calls; it is past the phase
        pass
    os.kill(child.pid, signal.SIGKILL)
    out, _ = child.communicate()
    assert child.returncode == -signal.SIGKILL and b"finished" not in out

    assert open(os.path.join(root, "latest")).read().strip() == "step-1"
    found = find_resumable(str(run), auto=False)
    assert found == p1  # never a half-written folder, and no warning needed
    assert load_checkpoint(found).state.step == 1
    # the run continues: the next save cleans the debris and completes
    p2 = _save(run, 2)
    assert find_resumable(str(run), auto=False) == p2
    assert sorted(os.listdir(root)) == ["latest", "step-1", "step-2"]


# ---------------------------------------------------------------- fingerprint / compatibility

@pytest.fixture
def model_and_data(tmp_path):
    mdir = tmp_path / "model"
    mdir.mkdir()
    (mdir / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    torch.manual_seed(0)
    save_file({"w": torch.randn(128, 128)}, str(mdir / "model.safetensors"))
    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "a"}\n{"text": "b"}\n')
    return mdir, data


def _fp(mdir, data, **overrides):
    cfg = to_dict(load_config(base={"model": str(mdir)}, overrides=[f"--{k}={v}" for k, v in overrides.items()]))
    mcfg = json.loads((mdir / "config.json").read_text())
    return fingerprint(str(mdir), mcfg, [str(data)], key_hparams(cfg))


def test_compatible_when_nothing_changed_or_model_moved(model_and_data, tmp_path):
    mdir, data = model_and_data
    saved = _fp(mdir, data)
    assert saved["hparams"]["train.lr"] == 2e-4 and saved["hparams"]["lora.targets"] == "all-linear"
    assert check_compatible(saved, _fp(mdir, data, **{"train.log_every": 5, "train.save_every": 7}), False) == []
    moved = tmp_path / "elsewhere"
    shutil.copytree(mdir, moved)
    assert check_compatible(saved, _fp(moved, data), False) == []


def test_changed_data_model_or_hparams_refused_unless_force(model_and_data):
    mdir, data = model_and_data
    saved = _fp(mdir, data)
    data.write_text('{"text": "a"}\n{"text": "CHANGED"}\n')
    with pytest.raises(FourbitError) as e:
        check_compatible(saved, _fp(mdir, data), False)
    assert "train.jsonl" in str(e.value) and "--force" in str(e.value)
    with pytest.warns(UserWarning, match="train.jsonl"):
        assert len(check_compatible(saved, _fp(mdir, data), True)) == 1

    saved = _fp(mdir, data)
    with pytest.raises(FourbitError, match=r"`lora.r` changed from 16 to 8; `train.lr` changed from 0.0002 to 0.001"):
        check_compatible(saved, _fp(mdir, data, **{"train.lr": 1e-3, "lora.r": 8}), False)

    save_file({"w": torch.randn(128, 128)}, str(mdir / "model.safetensors"))  # same shape, other weights
    with pytest.raises(FourbitError, match="model weights differ"):
        check_compatible(saved, _fp(mdir, data), False)
    (mdir / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 128}))
    with pytest.raises(FourbitError, match="config.json differs"):
        check_compatible(saved, _fp(mdir, data), False)

    hub_a = fingerprint("org/model-a", {"hidden_size": 64}, [str(data)], {})
    hub_b = fingerprint("org/model-b", {"hidden_size": 64}, [str(data)], {})
    with pytest.raises(FourbitError, match="org/model-a.*org/model-b"):
        check_compatible(hub_a, hub_b, False)
    with pytest.raises(FourbitError, match="does not exist"):
        fingerprint("org/model-a", {}, [str(data) + ".missing"], {})

"""Crash-safe training checkpoints: everything needed to continue a run exactly, written atomically.

Layout of a run folder's `checkpoints/`:

    step-N/                       one complete checkpoint (never partially written, see below)
      adapter_model.safetensors   LoRA weights (safetensors: never pickle for weights)
      adapter_config.json         PEFT-style adapter config
      optimizer.pt                optimizer state_dict (torch.save; read back with weights_only=True)
      scheduler.pt                LR scheduler state_dict (same)
      rng.pt                      python / numpy / torch CPU / CUDA RNG states, as tensors and plain data
      trainer_state.json          TrainerState (step, epoch, data position, ...) + fingerprint
      config.yaml                 the resolved run config
      manifest.json               size and sha256 of every file above; written last
    latest                        the name of the newest complete checkpoint; written after the rename
    .tmp-step-N-PID/              a save in progress (ignored by resume, removed by the next save)

Why it is safe against `kill -9` and power loss: files go into `.tmp-step-N-PID/`, each is
fsynced, the manifest is written last, the folder is fsynced and only then renamed to `step-N`
(a rename is atomic), then `latest` is replaced atomically. Resume reads `latest` and verifies
the manifest (sizes + hashes), so a half-written folder is never picked; a checkpoint that went
bad later (truncated, file missing) is refused naming the file, or skipped with a warning under
`resume: auto`. A `step-M` newer than `latest` is ignored: it is either a save killed between its
rename and the pointer update, or left from a timeline that was abandoned when resuming earlier.

The trainer's side. Save at an optimizer-step boundary (after `optimizer.step()`,
`scheduler.step()`, `zero_grad()`); the RNG states are captured inside `save_checkpoint`. Resume:
build model, optimizer and scheduler first, then load the adapter, `optimizer.load_state_dict`,
`scheduler.load_state_dict` (building a scheduler writes lr into the optimizer, so its state is
loaded after both exist); rebuild the data order of `state.epoch` from the seed and skip
`state.batch_in_epoch` micro-batches; call `restore_rng(ckpt.rng)` last, just before the first
micro-batch, so nothing done while rebuilding consumes the restored streams.

Why our own code and not accelerate's `save_state`: that stores RNG states as pickles that need
`weights_only=False` and is not atomic; here every file loads without running code and a save is
all-or-nothing.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import re
import shutil
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch

from ..errors import FourbitError
from ..safety import (fsync_dir, read_json, read_safetensors, safe_join, safe_torch_load, safe_yaml_load,
                      sha256_file)

FORMAT_VERSION = 1
REQUIRED_FILES = ("adapter_model.safetensors", "adapter_config.json", "optimizer.pt", "scheduler.pt",
                  "rng.pt", "trainer_state.json", "config.yaml")
_STEP_RE = re.compile(r"^step-(\d+)$")


@dataclass
class TrainerState:
    """Where training stands; saved as JSON in every checkpoint."""
    step: int = 0            # optimizer steps done
    epoch: int = 0           # current epoch, 0-based
    batch_in_epoch: int = 0  # micro-batches consumed in the current epoch: skip this many on resume
    micro_step: int = 0      # micro-batches consumed in total
    tokens_seen: int = 0     # trainable tokens seen so far
    bad_steps: int = 0       # steps not applied because the loss or gradient was not finite
    extra: dict = field(default_factory=dict)  # free-form JSON-able data (e.g. best eval loss)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainerState":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class Checkpoint:
    """Everything `load_checkpoint` read back, validated."""
    path: str
    state: TrainerState
    adapter: dict
    adapter_config: dict
    optimizer_state: dict
    scheduler_state: dict
    config: dict
    fingerprint: dict
    rng: dict


# ---------------------------------------------------------------- RNG

def capture_rng() -> dict:
    """Every global RNG state (python, numpy, torch CPU, each CUDA device) as tensors and plain data.

    The result loads with `torch.load(weights_only=True)`: no numpy arrays or tuples of odd types.
    """
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    return {
        "python": {"version": py_version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss": py_gauss},
        "numpy": {"name": str(np_name), "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64).copy()),
                  "pos": int(np_pos), "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "torch": torch.get_rng_state(),
        "cuda": [s.cpu() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
    }


def restore_rng(d: dict) -> None:
    """Set every global RNG from `capture_rng`'s dict. Warns when the CUDA device count differs."""
    p = d["python"]
    random.setstate((int(p["version"]), tuple(int(x) for x in p["state"].tolist()), p["gauss"]))
    n = d["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), int(n["pos"]), int(n["has_gauss"]),
                         float(n["gauss"])))
    torch.set_rng_state(d["torch"].to(torch.uint8))
    saved = d.get("cuda") or []
    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for i, s in enumerate(saved[:have]):
        torch.cuda.set_rng_state(s.to(torch.uint8), i)
    if len(saved) != have and (saved or have):
        warnings.warn(f"The checkpoint holds RNG states for {len(saved)} CUDA device(s) but {have} are visible; "
                      "dropout on the GPU will not replay exactly (the data order is unaffected).", stacklevel=2)


# ---------------------------------------------------------------- fingerprint + compatibility

def _sampled_hash(path: str, samples: int = 4, chunk: int = 1 << 16) -> str:
    """sha256 of the size and a few spaced chunks: tells fine-tunes of one architecture apart in ms."""
    size = os.path.getsize(path)
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        for i in range(samples):
            f.seek(max(0, (size - chunk) * i // max(1, samples - 1)))
            h.update(f.read(chunk))
    return h.hexdigest()


_VOLATILE_MODEL_KEYS = ("_name_or_path", "transformers_version", "_commit_hash", "torch_dtype", "dtype",
                        "use_cache", "_attn_implementation_autoset", "attn_implementation")
_WEIGHT_EXT = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def fingerprint(model_id_or_dir: str, model_config: dict, data_files: list[str], key_hparams: dict) -> dict:
    """Identify what a run trains on, so a resume can refuse a silently changed model, data or setting.

    Args:
        model_id_or_dir: the hub id or local folder of the base model. For a local folder (pass the
            resolved snapshot folder for hub models where you have it) the weight files are hashed
            by size + sampled content, so moving or copying the folder keeps the fingerprint.
        model_config: the model's config as a dict (volatile keys like `_name_or_path` are ignored).
        data_files: local training data files in load order; their full content is hashed.
        key_hparams: settings that must not change on resume (see `key_hparams`).
    """
    files = None
    if os.path.isdir(model_id_or_dir):
        names = sorted(n for n in os.listdir(model_id_or_dir) if n.endswith(_WEIGHT_EXT))
        files = {n: _sampled_hash(os.path.join(model_id_or_dir, n)) for n in names}
    cfg = {k: v for k, v in model_config.items() if k not in _VOLATILE_MODEL_KEYS}
    cfg_hash = hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()
    data = []
    for p in data_files:
        if not os.path.isfile(p):
            raise FourbitError(f"Training data file `{p}` does not exist (while fingerprinting the run).")
        data.append({"name": os.path.basename(p), "size": os.path.getsize(p), "sha256": sha256_file(p)})
    return {"model": model_id_or_dir, "model_local": files is not None, "model_config": cfg_hash,
            "model_files": files, "data": data, "hparams": dict(key_hparams)}


KEY_HPARAMS = ("quant.bits", "quant.type", "quant.double_quant", "quant.compute_dtype", "quant.blocksize",
               "lora.r", "lora.alpha", "lora.dropout", "lora.targets",
               "data.format", "data.max_length", "data.chat_template", "data.train_on", "data.last_turn_only",
               "data.truncation", "data.on_bad_row", "data.packing", "data.shuffle",
               "train.lr", "train.epochs", "train.max_steps", "train.micro_batch_size", "train.grad_accum",
               "train.warmup_ratio", "train.warmup_steps", "train.schedule", "train.min_lr_ratio",
               "train.weight_decay", "train.adam_beta1", "train.adam_beta2", "train.adam_eps",
               "train.max_grad_norm", "train.optimizer", "train.seed")


def key_hparams(config: dict) -> dict:
    """The settings from a resolved config dict (`config.to_dict`) that must match on resume.

    Logging, eval, save cadence, device and threads may change freely; these may not (they change
    the data order, the adapter's shape or the optimisation path).
    """
    out = {}
    for key in KEY_HPARAMS:
        node: Any = config
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        out[key] = node
    return out


def check_compatible(saved: dict, current: dict, force: bool) -> list[str]:
    """Differences between the fingerprint in a checkpoint and the current run's.

    Raises FourbitError naming each difference and `--force` unless `force`; with `force` the
    differences are returned and a warning is issued.
    """
    diffs = []
    if saved.get("model_local") and current.get("model_local"):
        if saved.get("model_files") != current.get("model_files"):
            diffs.append(f"model weights differ (checkpoint: `{saved.get('model')}`, now: `{current.get('model')}`)")
    elif saved.get("model") != current.get("model"):
        diffs.append(f"model changed from `{saved.get('model')}` to `{current.get('model')}`")
    if saved.get("model_config") != current.get("model_config"):
        diffs.append("the model's config.json differs")
    s_data, c_data = saved.get("data", []), current.get("data", [])
    if [d["sha256"] for d in s_data] != [d["sha256"] for d in c_data]:
        if len(s_data) != len(c_data):
            diffs.append(f"training data changed: {len(s_data)} file(s) then, {len(c_data)} now")
        for a, b in zip(s_data, c_data):
            if a["sha256"] != b["sha256"]:
                diffs.append(f"training data file `{b['name']}` differs from `{a['name']}` at save "
                             f"({a['size']} -> {b['size']} bytes)")
    s_hp, c_hp = saved.get("hparams", {}), current.get("hparams", {})
    for k in sorted(set(s_hp) | set(c_hp)):
        if s_hp.get(k, "<unset>") != c_hp.get(k, "<unset>"):
            diffs.append(f"`{k}` changed from {s_hp.get(k, '<unset>')!r} to {c_hp.get(k, '<unset>')!r}")
    if diffs and not force:
        raise FourbitError("Refusing to resume: the run changed since the checkpoint was saved: "
                           + "; ".join(diffs) + ". Resuming would not continue the same training. Restore the "
                           "original model/data/settings, start a new run (another `output` folder), or pass "
                           "`--force` to resume anyway.")
    if diffs:
        warnings.warn("Resuming with --force although the run changed: " + "; ".join(diffs), stacklevel=2)
    return diffs


# ---------------------------------------------------------------- writing

def _write(path: str, write_fn) -> dict:
    """Write a file through `write_fn(fileobj)`, fsync it, return its manifest entry."""
    with open(path, "wb") as f:
        write_fn(f)
        f.flush()
        os.fsync(f.fileno())
    return {"size": os.path.getsize(path), "sha256": sha256_file(path)}


def _test_pause() -> None:
    """Test-only seam: FOURBIT_TEST_SLOW_SAVE=SECONDS sleeps between the steps of a save (to kill -9 it)."""
    time.sleep(float(os.environ.get("FOURBIT_TEST_SLOW_SAVE") or 0))


def _plain(obj: Any) -> Any:
    """Plain YAML/JSON data: tuples become lists."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def save_checkpoint(run_dir: str, state: TrainerState, adapter: dict, adapter_config: dict,
                    optimizer_state: dict, scheduler_state: dict, config: dict, fingerprint: dict,
                    keep: int = 0, rng: Optional[dict] = None) -> str:
    """Write `run_dir/checkpoints/step-{state.step}` atomically, point `latest` at it, prune old ones.

    Args:
        adapter: LoRA tensors by PEFT name (moved to CPU, made contiguous here).
        optimizer_state / scheduler_state: `.state_dict()` of each (tensors and plain data only).
        config: the resolved run config as a dict; fingerprint: from `fingerprint()`.
        keep: keep only the newest `keep` complete checkpoints (0 keeps all).
        rng: RNG states to store; default `capture_rng()` now (call at a step boundary).
    Returns:
        The path of the new checkpoint folder.
    """
    import yaml
    from safetensors.torch import save as st_save
    root = os.path.join(run_dir, "checkpoints")
    os.makedirs(root, exist_ok=True)
    for name in os.listdir(root):  # leftovers of saves that were killed; one writer per run folder
        if name.startswith((".tmp-step-", ".old-step-")):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    name = f"step-{int(state.step)}"
    final = os.path.join(root, name)
    tmp = os.path.join(root, f".tmp-{name}-{os.getpid()}")
    os.makedirs(tmp)
    rng = capture_rng() if rng is None else rng
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in adapter.items()}
    meta = {"format": "pt"}
    writers = {
        "adapter_model.safetensors": lambda f: f.write(st_save(tensors, metadata=meta)),
        "adapter_config.json": lambda f: f.write(json.dumps(_plain(adapter_config), indent=2).encode()),
        "optimizer.pt": lambda f: torch.save(optimizer_state, f),
        "scheduler.pt": lambda f: torch.save(scheduler_state, f),
        "rng.pt": lambda f: torch.save(rng, f),
        "trainer_state.json": lambda f: f.write(json.dumps(
            {"format": FORMAT_VERSION, "state": dataclasses.asdict(state), "fingerprint": _plain(fingerprint)},
            indent=2).encode()),
        "config.yaml": lambda f: f.write(yaml.safe_dump(_plain(config), sort_keys=False).encode()),
    }
    files = {}
    for fname, fn in writers.items():
        files[fname] = _write(os.path.join(tmp, fname), fn)
        _test_pause()
    manifest = {"format": FORMAT_VERSION, "step": int(state.step), "created": time.time(), "files": files}
    _write(os.path.join(tmp, "manifest.json"), lambda f: f.write(json.dumps(manifest, indent=2).encode()))
    fsync_dir(tmp)
    _test_pause()
    old = None
    if os.path.exists(final):  # re-saving a step (after resuming from it): swap, then delete the old one
        old = os.path.join(root, f".old-{name}-{os.getpid()}")
        os.rename(final, old)
    os.rename(tmp, final)
    fsync_dir(root)
    _test_pause()
    _write_latest(root, name)
    if old:
        shutil.rmtree(old, ignore_errors=True)
    if keep > 0:
        prune_checkpoints(run_dir, keep, current_step=int(state.step))
    return final


def _write_latest(root: str, name: str) -> None:
    tmp = os.path.join(root, f".latest.tmp-{os.getpid()}")
    _write(tmp, lambda f: f.write((name + "\n").encode()))
    os.replace(tmp, os.path.join(root, "latest"))
    fsync_dir(root)


def _list_steps(root: str) -> dict[int, str]:
    if not os.path.isdir(root):
        return {}
    out = {}
    for name in os.listdir(root):
        m = _STEP_RE.match(name)
        if m and os.path.isdir(os.path.join(root, name)):
            out[int(m.group(1))] = os.path.join(root, name)
    return out


def prune_checkpoints(run_dir: str, keep: int, current_step: Optional[int] = None) -> list[str]:
    """Delete all but the newest `keep` complete checkpoints at or below `current_step`.

    Broken folders older than the newest kept one go too; the newest complete checkpoint and
    anything newer than `current_step` are never touched. Returns the deleted paths.
    """
    root = os.path.join(run_dir, "checkpoints")
    steps = _list_steps(root)
    if current_step is not None:
        steps = {s: p for s, p in steps.items() if s <= current_step}
    complete = []
    for s in sorted(steps, reverse=True):
        try:
            verify_checkpoint(steps[s], hashes=False)
            complete.append(s)
        except FourbitError:
            pass
    kept = set(complete[:max(keep, 1)])
    if not kept:
        return []
    deleted = []
    for s, p in steps.items():
        if s not in kept and s < max(kept):
            shutil.rmtree(p, ignore_errors=True)
            deleted.append(p)
    return deleted


# ---------------------------------------------------------------- reading

def verify_checkpoint(path: str, hashes: bool = True) -> dict:
    """Check a checkpoint folder against its manifest; return the manifest.

    Raises FourbitError naming the first missing, truncated or corrupt file.
    """
    def broken(why: str) -> FourbitError:
        return FourbitError(f"Checkpoint `{path}` is incomplete or damaged: {why}. Resume from an earlier checkpoint "
                            "(`resume: auto` picks the previous complete one) or delete this folder.")
    if not os.path.isdir(path):
        raise broken("the folder does not exist")
    mpath = os.path.join(path, "manifest.json")
    if not os.path.isfile(mpath):
        raise broken(f"`{mpath}` is missing (the save was interrupted before it finished)")
    try:
        with open(mpath, encoding="utf-8") as f:
            manifest = json.load(f)
        files = dict(manifest["files"])
    except (OSError, ValueError, KeyError, TypeError):
        raise broken(f"`{mpath}` is not a valid manifest") from None
    if manifest.get("format", 0) > FORMAT_VERSION:
        raise broken(f"`{mpath}` has format {manifest.get('format')}, newer than this fourbit understands "
                     f"({FORMAT_VERSION}); upgrade fourbit")
    for fname in REQUIRED_FILES:
        if fname not in files:
            raise broken(f"the manifest does not list `{fname}`")
    for fname, entry in files.items():
        fpath = safe_join(path, fname)
        if not os.path.isfile(fpath):
            raise broken(f"the file `{fpath}` is missing")
        size = os.path.getsize(fpath)
        if size != entry.get("size"):
            kind = "truncated" if size < entry.get("size", 0) else "the wrong size"
            raise broken(f"the file `{fpath}` is {kind} ({size} bytes on disk, {entry.get('size')} when saved)")
        if hashes and sha256_file(fpath) != entry.get("sha256"):
            raise broken(f"the file `{fpath}` is corrupt (its sha256 differs from the one recorded at save)")
    return manifest


def load_checkpoint(path: str, map_location: Any = "cpu") -> Checkpoint:
    """Read and validate a checkpoint folder written by `save_checkpoint`.

    Every file is checked against the manifest first; pickled files are read with
    `weights_only=True` (a file carrying code is refused), weights through safetensors.
    """
    if not os.path.isfile(os.path.join(path, "manifest.json")) and os.path.isdir(os.path.join(path, "checkpoints")):
        raise FourbitError(f"`{path}` is a run folder, not a checkpoint. Pass one of its `checkpoints/step-N` "
                           "folders, or use `resume: auto` to pick the newest complete one.")
    verify_checkpoint(path)
    ts = read_json(os.path.join(path, "trainer_state.json"), "trainer state file")
    if not isinstance(ts, dict) or not isinstance(ts.get("state"), dict):
        raise FourbitError(f"The trainer state file `{os.path.join(path, 'trainer_state.json')}` lacks its `state` "
                           "object; the checkpoint was not written by fourbit. Use another checkpoint.")
    rng = safe_torch_load(os.path.join(path, "rng.pt"), what="RNG state file")
    return Checkpoint(
        path=path,
        state=TrainerState.from_dict(ts["state"]),
        adapter=read_safetensors(os.path.join(path, "adapter_model.safetensors"),
                                 device=str(map_location) if isinstance(map_location, (str, torch.device)) else "cpu"),
        adapter_config=read_json(os.path.join(path, "adapter_config.json"), "adapter config"),
        optimizer_state=safe_torch_load(os.path.join(path, "optimizer.pt"), map_location, what="optimizer state file"),
        scheduler_state=safe_torch_load(os.path.join(path, "scheduler.pt"), map_location, what="scheduler state file"),
        config=safe_yaml_load(os.path.join(path, "config.yaml")) or {},
        fingerprint=ts.get("fingerprint") or {},
        rng=rng,
    )


def find_resumable(run_dir: str, auto: bool) -> Optional[str]:
    """The checkpoint to resume `run_dir` from, or None when it has none.

    The newest candidate is the one `checkpoints/latest` names (all `step-N` folders when there is
    no pointer). It is fully verified; if it is broken, `auto=False` raises an error naming the bad
    file, `auto=True` warns and falls back to the previous complete checkpoint.
    """
    root = os.path.join(run_dir, "checkpoints")
    steps = _list_steps(root)
    pointer, problems = None, []
    lpath = os.path.join(root, "latest")
    if os.path.isfile(lpath):
        with open(lpath, encoding="utf-8", errors="replace") as f:
            text = f.read().strip()
        m = _STEP_RE.match(text)
        if m:
            pointer = int(m.group(1))
            if pointer not in steps:
                problems.append(f"`{lpath}` names `{text}`, which does not exist")
        else:
            problems.append(f"`{lpath}` holds {text[:40]!r} instead of a checkpoint name")
    candidates = sorted((s for s in steps if pointer is None or s <= pointer), reverse=True)
    if problems and not auto:
        raise FourbitError(f"Cannot resume `{run_dir}`: {problems[0]}. Use `resume: auto` to fall back to the "
                           "newest complete checkpoint, or pass a checkpoint folder.")
    for s in candidates:
        try:
            verify_checkpoint(steps[s])
        except FourbitError as e:
            if not auto:
                raise
            problems.append(str(e))
            continue
        if problems:
            warnings.warn(f"Resuming from `{steps[s]}` instead of a newer checkpoint: " + " ".join(problems),
                          stacklevel=2)
        return steps[s]
    if problems:
        raise FourbitError(f"No complete checkpoint to resume in `{root}`: " + " ".join(problems)
                           + " Delete the damaged folders to start over, or use another `output` folder.")
    return None

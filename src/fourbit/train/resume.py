"""Checkpoint glue of the training loop: what goes into a checkpoint, how a run is rebuilt from one.

The checkpoint files themselves (atomic writes, manifest, `latest`, pruning, fingerprint checks)
are `checkpoint.py`'s; this module decides what a fourbit run stores and restores, in the order
`checkpoint.py` prescribes: adapter -> optimizer -> scheduler -> data position; the caller
restores the RNG states last, just before the first micro-batch.

Data position: the micro-batch plan is a pure function of (seed, epoch), so resuming = rebuilding
the plan and continuing at plan step `pos`. `TrainerState` records it as (epoch, micro-batches
consumed in that epoch); `extra.plan_step` holds `pos` itself, and both must agree.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import warnings
from typing import Optional

import numpy as np
import torch

from ..config import Config, to_dict
from ..errors import FourbitError
from ..lora import PEFT_PREFIX, adapter_config, adapter_state_dict, lora_layers
from . import guards
from .checkpoint import TrainerState, find_resumable, fingerprint, key_hparams, save_checkpoint


def data_positions(plan) -> list[tuple[int, int, int]]:
    """For each pos in 0..len(plan.steps): (epoch, micro-batches consumed in it, micro-batches consumed in total)
    before step `pos`. At an epoch boundary this is (next epoch, 0, ...); the last entry is the end of the run."""
    out, in_epoch, total, prev = [], 0, 0, None
    for pos in range(len(plan.steps) + 1):
        epoch = plan.epoch_of_step[min(pos, len(plan.steps) - 1)]
        if epoch != prev:
            in_epoch = 0
        out.append((epoch, in_epoch, total))
        if pos < len(plan.steps):
            in_epoch += len(plan.steps[pos])
            total += len(plan.steps[pos])
            prev = epoch
    return out



def _model_location(name: str) -> str:
    """A local folder for the fingerprint: the model folder, or the hub snapshot already on disk."""
    if os.path.isdir(name):
        return name
    try:
        from huggingface_hub import snapshot_download
        return snapshot_download(name, local_files_only=True)
    except Exception:  # not cached as a snapshot: the fingerprint compares the hub id instead
        return name


def _examples_digest(examples: list) -> str:
    """Tokens of the training set (count + 64 evenly spaced examples): catches a changed tokenizer or template."""
    h = hashlib.sha256(f"{len(examples)}|{sum(len(e.input_ids) for e in examples)}".encode())
    for i in sorted({k * (len(examples) - 1) // 63 for k in range(64)} if examples else ()):
        h.update(np.asarray(examples[i].input_ids, dtype=np.int64).tobytes())
        h.update(np.asarray(examples[i].labels, dtype=np.int64).tobytes())
    return h.hexdigest()[:16]


def run_fingerprint(run) -> dict:
    """What this run trains on: model files + config, data files, tokenized data, key settings."""
    from ..data.sources import is_local, source_files
    from ..model import model_config_dict
    cfg = run.cfg
    hp = key_hparams(to_dict(cfg))
    hp["data.tokenized"] = _examples_digest(run.examples)
    files = source_files(cfg.data.train) if is_local(cfg.data.train) else []
    if not files:
        hp["data.hub"] = cfg.data.train
    return fingerprint(_model_location(cfg.model), model_config_dict(cfg.model), files, hp)


def save_state(run, state: TrainerState, fp: dict) -> str:
    cfg = run.cfg
    quant = to_dict(cfg.quant) if cfg.quant.bits else None
    return save_checkpoint(cfg.output, state, adapter_state_dict(run.model),
                           adapter_config(run.model, cfg.lora, cfg.model, quant), run.optimizer.state_dict(),
                           run.scheduler.state_dict(), to_dict(cfg), fp, keep=cfg.train.keep_checkpoints)


def checkpoint_to_resume(cfg: Config, mode: str) -> Optional[str]:
    root = os.path.join(cfg.output, "checkpoints")
    if mode == "never":
        if os.path.isdir(root) and any(n.startswith("step-") for n in os.listdir(root)):
            print(f"note: `{root}` holds checkpoints of an earlier run; starting over (train.resume: never). "
                  "Pass --resume or set train.resume: auto to continue that run instead.", file=sys.stderr)
        return None
    path = find_resumable(cfg.output, auto=mode == "auto")
    if path is None and mode == "always":
        raise FourbitError(f"Nothing to resume: `{root}` holds no checkpoint. Run without --resume to start the "
                           "run (train.resume: auto resumes when there is a checkpoint and starts otherwise).")
    return path


def restore(run, ck, changed: bool) -> int:
    """Load adapter -> optimizer -> scheduler into the built run; returns the plan position to continue at.

    The RNG states are restored later, by the caller, just before the first micro-batch.
    """
    cfg = run.cfg
    layers = dict(lora_layers(run.model))
    want = {f"{PEFT_PREFIX}{n}.{p}.weight" for n in layers for p in ("lora_A", "lora_B")}
    if set(ck.adapter) != want:
        raise FourbitError(f"The checkpoint `{ck.path}` holds LoRA weights for other modules than this run "
                           f"(lora.targets or the model changed); it cannot be resumed, even with --force.")
    with torch.no_grad():
        for name, layer in layers.items():
            for part in ("lora_A", "lora_B"):
                w = getattr(layer, part).weight
                t = ck.adapter[f"{PEFT_PREFIX}{name}.{part}.weight"]
                if t.shape != w.shape:
                    raise FourbitError(f"The checkpoint `{ck.path}` has LoRA rank {t.shape} where this run has "
                                       f"{tuple(w.shape)} ({name}.{part}); it cannot be resumed, even with --force.")
                w.copy_(t.to(w.device, w.dtype))
    with guards.quiet_paged_optimizer(run.paged_off_cuda):
        run.optimizer.load_state_dict(ck.optimizer_state)
    run.scheduler.load_state_dict(ck.scheduler_state)   # after the optimizer: it owns the lr written there
    if changed:  # --force: the state continues, but this config's optimizer settings apply from here on
        t, sched = cfg.train, run.scheduler
        sched.base_lrs = [t.lr for _ in run.optimizer.param_groups]
        for g, fn in zip(run.optimizer.param_groups, sched.lr_lambdas):
            g.update(lr=t.lr * fn(sched.last_epoch), initial_lr=t.lr)
            g.update({k: v for k, v in (("betas", (t.adam_beta1, t.adam_beta2)), ("eps", t.adam_eps),
                                        ("weight_decay", t.weight_decay)) if k in g})
    st = ck.state
    run.micro = min(cfg.train.micro_batch_size, int(st.extra.get("micro_batch_size") or cfg.train.micro_batch_size))
    positions = data_positions(run.plan)
    pos = next((p for p, (e, b, _) in enumerate(positions) if (e, b) == (st.epoch, st.batch_in_epoch)), None)
    saved_pos = st.extra.get("plan_step", st.step)
    if pos is None or pos != saved_pos:
        if not changed:
            raise FourbitError(f"The checkpoint `{ck.path}` is at epoch {st.epoch}, micro-batch {st.batch_in_epoch}, "
                               "which this run's micro-batch plan does not have; the data order changed. Resume "
                               "with the settings it was saved with, or start a new run.")
        pos = min(int(saved_pos), len(run.plan.steps))
        warnings.warn(f"--force: the micro-batch plan changed; continuing at step {pos + 1} of the new plan, so "
                      "the data order differs from the original run.", stacklevel=2)
    return pos


def open_metrics(path: str, keep_through: Optional[int]):
    """metrics.jsonl for appending. Fresh run: emptied. Resume at plan position p: records after p dropped
    (logged after the checkpoint and about to be redone), as is a line torn by a kill."""
    if keep_through is None:
        return open(path, "w", encoding="utf-8")
    kept = []
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if rec.get("batch", rec.get("step", 0)) <= keep_through:
                    kept.append(json.dumps(rec) + "\n")
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(kept)
    os.replace(path + ".tmp", path)
    return open(path, "a", encoding="utf-8")

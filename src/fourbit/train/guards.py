"""What the training loop does when something goes wrong: a stop signal, a non-finite step, out of memory.

- Preemption: SIGTERM / SIGINT only set a flag (`StopSignals`); the loop finishes the optimizer step
  it is in (all of its micro-batches), writes a checkpoint and exits with 143 / 130 (`Preempted`).
  A second signal stops at once; the checkpoint writer is atomic, so that is safe too.
- Non-finite loss or gradient: the step is not applied; after `train.max_bad_steps` in a row the
  run stops (`too_many_bad_steps`), keeping the checkpoints it has.
- Out of memory: `after_oom` either halves the micro-batch (`train.auto_micro_batch`) or stops with
  the peak memory and the settings that lower it.

Test-only seams (environment variables, read here and nowhere else) make each path testable on CPU:
FOURBIT_TEST_NAN_STEPS=3,4 poisons the loss of those steps (1-based batch numbers);
FOURBIT_TEST_OOM_ABOVE=N raises `torch.cuda.OutOfMemoryError` for micro-batches of more than N rows;
FOURBIT_TEST_SIGNAL_AT=STEP:MICRO[:SIG] sends the process a signal (default SIGTERM) after that
micro-batch (1-based step, 0-based micro-batch), i.e. from inside a gradient-accumulation group.
"""
from __future__ import annotations

import contextlib
import math
import os
import re
import signal
import sys
import threading
import warnings
from typing import Optional

import torch

from ..errors import FourbitError

EXIT_CODES = {signal.SIGTERM: 143, signal.SIGINT: 130}


class Preempted(SystemExit):
    """Raised after the checkpoint of a stop signal is written; exits the CLI with 143 (SIGTERM) / 130 (SIGINT)."""

    def __init__(self, signum: int, checkpoint: str):
        super().__init__(EXIT_CODES.get(signum, 128 + int(signum)))
        self.signum, self.checkpoint = signum, checkpoint


class StopSignals:
    """Context manager: SIGTERM / SIGINT set `self.signum` instead of killing the process mid-step.

    Only the main thread may install signal handlers; elsewhere this does nothing (signals keep
    their usual effect).
    """

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._old: dict = {}

    def _handler(self, signum, frame) -> None:
        if self.signum is not None:  # a second signal: stop now
            self.__exit__(None, None, None)
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(EXIT_CODES.get(signum, 128 + signum))
        self.signum = signum
        name = signal.Signals(signum).name
        print(f"\n{name} received: finishing the current optimizer step, then writing a checkpoint "
              f"(send it again to stop at once).", file=sys.stderr, flush=True)

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for s in EXIT_CODES:
                self._old[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old = {}


# ---------------------------------------------------------------- non-finite steps

def is_finite(loss: float, grad_norm: float) -> bool:
    return math.isfinite(loss) and math.isfinite(grad_norm)


def bad_step_warning(step: int, pos: int, epoch: int, rows: list[int], loss: float, gnorm: float) -> str:
    shown = ", ".join(map(str, rows[:8])) + (", ..." if len(rows) > 8 else "")
    return (f"warning: batch {pos + 1} (epoch {epoch}, training rows {shown}) gave a non-finite "
            f"{'loss' if not math.isfinite(loss) else 'gradient'} (loss {loss}, grad norm {gnorm}); "
            f"not applied: weights, optimizer and learning-rate schedule stay at step {step}.")


def too_many_bad_steps(n: int, first_pos: int, last_pos: int, checkpoint: Optional[str], cfg) -> FourbitError:
    kept = (f"The last good checkpoint is `{checkpoint}`." if checkpoint else
            "No checkpoint was written before this (train.save_every).")
    fp16 = " Training in float16 overflows easily: set quant.compute_dtype: bfloat16." \
        if cfg.quant.compute_dtype == "float16" else ""
    return FourbitError(
        f"Stopped: {n} optimizer steps in a row (batches {first_pos + 1} to {last_pos + 1}) had a non-finite loss "
        f"or gradient (train.max_bad_steps = {cfg.train.max_bad_steps}); none of them was applied. {kept} "
        f"Usual causes: a learning rate too high (train.lr = {cfg.train.lr}; try a tenth), no gradient clipping "
        f"(train.max_grad_norm = {cfg.train.max_grad_norm}), or broken rows in those batches.{fp16} Resuming "
        "replays the same batches, so change one of these first (resuming with a changed setting needs --force).")


# ---------------------------------------------------------------- out of memory

def peak_memory(device: torch.device) -> str:
    """' (peak 21.3 GiB allocated of 23.6 GiB on NVIDIA L4)', or '' where torch does not track it."""
    if device.type != "cuda":
        return ""
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 30
    props = torch.cuda.get_device_properties(device)
    return f" (peak {peak:.2f} GiB allocated of {props.total_memory / 2 ** 30:.1f} GiB on {props.name})"


def oom_message(cfg, device: torch.device, micro: int, pos: int, detail: str = "") -> str:
    t, d = cfg.train, cfg.data
    accum = t.grad_accum * math.ceil(t.micro_batch_size / micro)
    tips = []
    if micro > 1:
        tips.append(f"--train.micro_batch_size={micro // 2} --train.grad_accum={accum * 2} (same effective batch), "
                    "or train.auto_micro_batch: true to do that automatically")
    tips.append(f"a lower data.max_length (now {d.max_length}; longer rows are cut or dropped by data.truncation)")
    if not t.grad_checkpointing:
        tips.append("train.grad_checkpointing: true (recomputes activations in the backward pass)")
    if d.packing:
        tips.append(f"data.packing: false (packed rows are all {d.max_length} tokens long)")
    return (f"Out of memory in optimizer step {pos + 1} with micro-batches of {micro} rows of up to {d.max_length} "
            f"tokens{peak_memory(device)}{detail}. To lower the memory: " + "; ".join(tips) + ". "
            "`fourbit plan CONFIG` predicts the peak before loading anything.")


def after_oom(cfg, device: torch.device, micro: int, pos: int, error: str = "") -> int:
    """The micro-batch size to retry step `pos` with, or a FourbitError explaining what to change.

    Args:
        error: the text of the OutOfMemoryError; its "Tried to allocate N" is quoted.
    """
    m = re.search(r"Tried to allocate [\d.]+ \w+", error)
    detail = f"; it {m.group(0)[0].lower()}{m.group(0)[1:]} more" if m else ""
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if not cfg.train.auto_micro_batch or micro <= 1:
        even = " even at micro-batch 1" if cfg.train.auto_micro_batch else ""
        raise FourbitError(oom_message(cfg, device, micro, pos, detail).replace("Out of memory", f"Out of memory{even}", 1))
    new = micro // 2
    old_acc = cfg.train.grad_accum * math.ceil(cfg.train.micro_batch_size / micro)
    new_acc = cfg.train.grad_accum * math.ceil(cfg.train.micro_batch_size / new)
    print(f"note: out of memory in step {pos + 1}{peak_memory(device)}{detail}; train.auto_micro_batch: continuing with "
          f"micro-batches of {new} rows and {new_acc} accumulation steps (was {micro} x {old_acc}), the same "
          f"effective batch of {cfg.train.micro_batch_size * cfg.train.grad_accum} rows.", file=sys.stderr, flush=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    return new


@contextlib.contextmanager
def quiet_paged_optimizer(paged_off_cuda: bool):
    """Hide bitsandbytes' 'Paged optimizers are not supported on CPU' warning (the loop printed a note already)."""
    if not paged_off_cuda:
        yield
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU")
        yield


# ---------------------------------------------------------------- test-only seams

def _env(name: str) -> str:
    return os.environ.get(name, "").strip()


def seam_poison(loss: torch.Tensor, pos: int) -> torch.Tensor:
    """FOURBIT_TEST_NAN_STEPS: make the loss of these 1-based batch numbers NaN (so the gradients are too)."""
    steps = _env("FOURBIT_TEST_NAN_STEPS")
    if steps and str(pos + 1) in steps.split(","):
        return loss * float("nan")
    return loss


def seam_oom(rows: int) -> None:
    """FOURBIT_TEST_OOM_ABOVE=N: a micro-batch of more than N rows 'runs out of memory'."""
    limit = _env("FOURBIT_TEST_OOM_ABOVE")
    if limit and rows > int(limit):
        raise torch.cuda.OutOfMemoryError(f"CUDA out of memory (test seam: micro-batch of {rows} > {limit} rows)")


def seam_signal(pos: int, micro_index: int) -> None:
    """FOURBIT_TEST_SIGNAL_AT=STEP:MICRO[:SIGNAME]: signal this process after that micro-batch."""
    spec = _env("FOURBIT_TEST_SIGNAL_AT")
    if not spec:
        return
    parts = spec.split(":")
    if int(parts[0]) == pos + 1 and int(parts[1]) == micro_index:
        os.kill(os.getpid(), getattr(signal, parts[2] if len(parts) > 2 else "SIGTERM"))

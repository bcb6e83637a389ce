"""The training loop: one optimizer step = `grad_accum` micro-batches, loss normalised by the
trainable tokens of the whole accumulated batch, clipped, guarded against non-finite values,
checkpointed so that a resumed run continues exactly as if it had never stopped.

A reader should be able to follow `train_step` in one sitting; setup lives in `prepare_run`, the
run (logging, checkpoints, resume, stop signals) in `run_training`, failure handling in `guards`.

Two counters: `pos` is the position in the micro-batch plan (accumulated batches processed,
skipped ones included; it is the data position), `state.step` the optimizer updates applied
(= the scheduler's step). They differ only after a non-finite step, which is consumed but not applied.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..config import Config, dump_config, to_dict
from ..errors import FourbitError
from ..lora import FlatLoRA, apply_lora, cache_optimizer_steps, describe_parameters, lora_parameters, save_adapter
from ..model import load_for_training, resolve_device
from . import guards
from .checkpoint import TrainerState, capture_rng, check_compatible, load_checkpoint, restore_rng
from .resume import checkpoint_to_resume, data_positions, open_metrics, restore, run_fingerprint, save_state
from .loss import IGNORE, causal_lm_loss
from .schedule import lr_factor, warmup_steps


@dataclass
class Plan:
    """The deterministic order of micro-batches: steps[k] = list of micro-batches (lists of row ids)."""
    steps: list[list[list[int]]]
    epoch_of_step: list[int]
    steps_per_epoch: int


def make_plan(n_rows: int, micro: int, accum: int, epochs: float, max_steps: int, shuffle: bool, seed: int) -> Plan:
    """Micro-batches per epoch (shuffled by (seed, epoch)), grouped `accum` at a time; a group never spans epochs."""
    if n_rows == 0:
        raise FourbitError("The training set is empty after validation and truncation; nothing to train on.")
    n_micro = math.ceil(n_rows / micro)
    per_epoch = math.ceil(n_micro / accum)
    total = max_steps if max_steps > 0 else max(1, math.ceil(epochs * per_epoch))
    steps, epoch_of = [], []
    epoch = 0
    while len(steps) < total:
        if shuffle:
            order = torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()
        else:
            order = list(range(n_rows))
        mbs = [order[i:i + micro] for i in range(0, n_rows, micro)]
        for i in range(0, len(mbs), accum):
            if len(steps) == total:
                break
            steps.append(mbs[i:i + accum])
            epoch_of.append(epoch)
        epoch += 1
    return Plan(steps, epoch_of, per_epoch)


@dataclass
class Run:
    """Everything a step needs, built once by `prepare_run`."""
    cfg: Config
    model: torch.nn.Module
    tokenizer: object
    device: torch.device
    train_rows: list            # Example objects, or packed groups when packing
    examples: list
    eval_examples: list
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    plan: Plan
    params: list
    collate: object
    report: object = None
    log: list = field(default_factory=list)
    micro: int = 0              # rows per forward pass now (train.auto_micro_batch may lower it after an OOM)
    flat: object = None         # lora.FlatLoRA: every adapter weight a view of one buffer, one optimizer tensor

    @property
    def paged_off_cuda(self) -> bool:
        """bitsandbytes' paged 8-bit optimizer on a CPU (it warns; the loop printed a note already)."""
        return self.cfg.train.optimizer == "paged_adamw_8bit" and self.device.type != "cuda"


def _build_optimizer(cfg: Config, params: list, device: torch.device) -> torch.optim.Optimizer:
    """AdamW as configured. Off CUDA there is nothing to page, and bitsandbytes' CPU AdamW is an
    unfused loop (~9x slower than torch's fused one on SmolLM2's adapters), so paged_adamw_32bit runs
    as torch's fused AdamW there: the same update with fp32 states."""
    t = cfg.train
    kw = dict(lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps, weight_decay=t.weight_decay)
    if t.optimizer == "adamw_torch" or (t.optimizer == "paged_adamw_32bit" and device.type != "cuda"):
        if t.optimizer != "adamw_torch":
            print(f"note: {t.optimizer} pages optimizer state only on CUDA; on {device.type} it runs as torch's "
                  "fused AdamW (same update, 32-bit states).", file=sys.stderr)
        return torch.optim.AdamW(params, fused=device.type in ("cuda", "cpu"), **kw)
    from .optim import paged_adamw
    if device.type != "cuda":
        print(f"note: {t.optimizer} pages optimizer state only on CUDA; on {device.type} it runs unpaged.",
              file=sys.stderr)
    with guards.quiet_paged_optimizer(device.type != "cuda"):
        return paged_adamw(32 if t.optimizer == "paged_adamw_32bit" else 8, params, **kw)


def _zero_grad(run: "Run") -> None:
    run.optimizer.zero_grad(set_to_none=True)
    if run.flat is not None:
        run.flat.zero_grad()                          # the per-layer gradients autograd accumulated


def setup_training(model, cfg: Config, policy: str, device: torch.device) -> tuple:
    """The step's setup on a model that has its LoRA: checkpointing `policy`, train mode, the flat
    adapter buffer, the optimizer and its per-step cast cache. Returns (policy applied, flat, params,
    optimizer). `prepare_run` and `plan_calibrate.prepare` (the memory plan's measurements) share it."""
    from .activations import apply_checkpointing
    if policy == "auto":                       # `fourbit train` passes the plan's choice; direct callers may not
        from ..plan import plan
        policy = plan(cfg, device=device.type).policy
    # fused norms / SwiGLU / grouped q,k,v and gate,up are the CUDA fast path (same math within bf16
    # rounding); the CPU keeps transformers' modules, which are faster there
    chosen = apply_checkpointing(model, policy, fuse=device.type == "cuda")
    model.train()
    # one buffer for all adapters: one optimizer tensor and one norm instead of 2 per layer (exact for
    # elementwise 32-bit AdamW; 8-bit states are blockwise, so they keep one tensor per weight)
    flat = FlatLoRA(model) if cfg.train.optimizer != "paged_adamw_8bit" else None
    params = [flat.flat] if flat is not None else lora_parameters(model)
    opt = _build_optimizer(cfg, params, device)
    cache_optimizer_steps(opt, model)  # A and s*B cast once per optimizer step for the GPU fast path
    return chosen, flat, params, opt


def prepare_run(cfg: Config, policy: Optional[str] = None) -> Run:
    """Load data, model and LoRA; build optimizer, schedule and the micro-batch plan.

    policy: the checkpointing policy the memory plan chose (for `auto`); None takes the config's.
    """
    from ..data import build_examples, collate, pack_examples
    torch.manual_seed(cfg.train.seed)
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    if cfg.data.train is None:
        raise FourbitError("Config key `data.train` is missing: set it to a .jsonl/.json/.parquet/.csv file or a "
                           "hub dataset name.")
    device = resolve_device(cfg.train.device)
    from ..model import load_tokenizer
    tok = load_tokenizer(cfg.model, cfg.trust_remote_code)
    from ..data import padding_stats
    from ..data.inspect import start_summary
    examples, report = build_examples(cfg.data.train, tok, cfg.data, split="train")
    eval_examples, eval_report = [], None
    if cfg.data.eval:
        eval_examples, eval_report = build_examples(cfg.data.eval, tok, cfg.data, split="eval")
    rows = pack_examples(examples, cfg.data.max_length) if cfg.data.packing else list(range(len(examples)))
    packing = None
    if cfg.data.packing:
        packing = padding_stats([len(e.input_ids) for e in examples], cfg.data.max_length,
                                cfg.train.micro_batch_size, rows)
    print(start_summary(report, eval_report, packing), flush=True)
    plan = make_plan(len(rows), cfg.train.micro_batch_size, cfg.train.grad_accum, cfg.train.epochs,
                     cfg.train.max_steps, cfg.data.shuffle, cfg.train.seed)

    model, _ = load_for_training(cfg, device)
    names = apply_lora(model, cfg.lora, seed=cfg.train.seed)
    policy = (policy or cfg.train.checkpointing_policy) if cfg.train.grad_checkpointing else "off"
    chosen, flat, params, opt = setup_training(model, cfg, policy, device)
    if cfg.train.grad_checkpointing and cfg.train.checkpointing_policy == "auto":
        print(f"activation checkpointing: `{chosen}` (checkpointing_policy auto, from the memory plan)", flush=True)
    print(f"LoRA on {len(names)} modules; {describe_parameters(model)}", flush=True)
    total = len(plan.steps)
    warm = warmup_steps(total, cfg.train.warmup_ratio, cfg.train.warmup_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, total, warm, cfg.train.schedule, cfg.train.min_lr_ratio))
    return Run(cfg, model, tok, device, rows, examples, eval_examples, opt, sched, plan, params, collate, report,
               micro=cfg.train.micro_batch_size, flat=flat)


def micro_batch(run: Run, row_ids: list[int], to_device: bool = True) -> dict:
    """Collate rows into tensors, on the run's device unless `to_device` is False (packed rows hold several examples)."""
    pad = run.tokenizer.pad_token_id
    if run.cfg.data.packing:
        groups = [run.train_rows[i] for i in row_ids]
        batch = run.collate(run.examples, pad, packed_groups=groups, max_length=run.cfg.data.max_length,
                            attn_implementation=getattr(run.model.config, "_attn_implementation", None))
    else:
        batch = run.collate([run.examples[i] for i in row_ids], pad)
    return {k: v.to(run.device, non_blocking=True) for k, v in batch.items()} if to_device else batch


def count_trainable(batch: dict) -> int:
    return int((batch["labels"][:, 1:] != IGNORE).sum())


def _count_tokens(b: dict) -> int:
    mask = b.get("attention_mask")
    return int(mask.sum()) if mask is not None and mask.dim() == 2 else int(b["input_ids"].numel())


def train_step(run: Run, pos: int) -> dict:
    """One optimizer step over the plan's micro-batches for step `pos`. Returns its metrics.

    Out of memory: with `train.auto_micro_batch` the step is retried with half the rows per forward
    pass (the same rows per step, so the same effective batch), from the same RNG state; otherwise
    it stops with a message saying what to lower.
    """
    while True:
        rng = capture_rng() if run.cfg.train.auto_micro_batch else None
        try:
            return _accumulate_and_step(run, pos)
        except torch.cuda.OutOfMemoryError as e:
            error = str(e)                            # leave the except block first: it pins the failed frames
        _zero_grad(run)                               # drop the partial accumulation
        run.micro = guards.after_oom(run.cfg, run.device, run.micro, pos, error)
        restore_rng(rng)


def _accumulate_and_step(run: Run, pos: int) -> dict:
    """The loss of each micro-batch is its CE *sum* divided by the trainable tokens of the whole
    accumulated batch, so the gradient equals that of one big batch whatever the split."""
    planned = run.plan.steps[pos]
    chunks = [mb[i:i + run.micro] for mb in planned for i in range(0, len(mb), run.micro)]
    batches = [micro_batch(run, ids, to_device=False) for ids in chunks]
    n_train = sum(count_trainable(b) for b in batches)            # trainable tokens in the accumulated batch
    n_tokens = sum(_count_tokens(b) for b in batches)
    if n_train == 0:
        return {"skipped": "no trainable tokens", "tokens": n_tokens, "trainable_tokens": 0}
    loss_sum = torch.zeros((), dtype=torch.float32, device=run.device)   # summed on the device: no sync
    for j, b in enumerate(batches):                                      # between micro-batches
        guards.seam_oom(len(chunks[j]))
        b = {k: v.to(run.device, non_blocking=True) for k, v in b.items()}
        ls, n = causal_lm_loss(run.model, b)
        if n:
            ls = guards.seam_poison(ls, pos)
            (ls / n_train).backward()
            loss_sum += ls.detach().float()
        del ls, b                     # the graph's teardown now, while the GPU is still busy with it
        guards.seam_signal(pos, j)
    max_norm = run.cfg.train.max_grad_norm
    if run.flat is not None:
        run.flat.gather_grads()                                    # flat.grad = all layers' gradients
    gn = torch.nn.utils.clip_grad_norm_(run.params, max_norm if max_norm > 0 else float("inf"))
    if hasattr(run.optimizer, "prefetch_states"):
        run.optimizer.prefetch_states()                            # paged states: queued before the host read
    loss_sum, gnorm = torch.stack([loss_sum, gn.float().to(run.device)]).tolist()   # the step's one host read
    loss = loss_sum / n_train
    if not guards.is_finite(loss, gnorm):
        _zero_grad(run)                                            # the step is not applied
        return {"skipped": "non-finite loss or gradient", "loss": loss, "grad_norm": gnorm,
                "tokens": n_tokens, "trainable_tokens": n_train}
    lr = run.optimizer.param_groups[0]["lr"]
    with guards.quiet_paged_optimizer(run.paged_off_cuda):
        run.optimizer.step()
    run.scheduler.step()
    _zero_grad(run)
    return {"loss": loss, "grad_norm": gnorm, "lr": lr, "tokens": n_tokens, "trainable_tokens": n_train}


def evaluate(run: Run, examples: Optional[list] = None, max_batches: int = 0) -> Optional[float]:
    """Token-weighted mean CE over the eval set (None without eval data)."""
    from ..infer import heldout_loss
    examples = run.eval_examples if examples is None else examples
    if not examples:
        return None
    return heldout_loss(run.model, run.tokenizer, examples, run.cfg.train.micro_batch_size, max_batches)


def save_final(run: Run, out_dir: str) -> None:
    quant = to_dict(run.cfg.quant) if run.cfg.quant.bits else None
    save_adapter(run.model, out_dir, run.cfg.lora, run.cfg.model, quant)
    if run.cfg.data.chat_template:
        # the template the data was rendered with travels with the adapter (chat, merge and export use it)
        from ..data import get_chat_template
        run.tokenizer.chat_template = get_chat_template(run.tokenizer, run.cfg.data.chat_template)
    run.tokenizer.save_pretrained(out_dir)


def _r(x: Optional[float]) -> Optional[float]:
    """Rounded for metrics.jsonl (8 decimals keep resume comparisons meaningful); None when not finite."""
    return round(x, 8) if x is not None and math.isfinite(x) else None


# ---------------------------------------------------------------- the run

def run_training(cfg: Config, resume: bool = False, force: bool = False) -> str:
    """`fourbit train`: the whole run. Returns the adapter folder.

    Args:
        resume: continue from the newest complete checkpoint and fail if there is none (`--resume`);
            otherwise `train.resume` decides (never / auto / always).
        force: resume even though the model, data or a key setting changed since the checkpoint.
    Raises:
        guards.Preempted (a SystemExit with code 143 / 130) after SIGTERM / SIGINT and its checkpoint.
    """
    from ..plan import check_fits
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        raise FourbitError(f"fourbit train was started as {world} processes (torchrun / WORLD_SIZE={world}); "
                           "several GPUs are not supported yet, and each process would train its own copy "
                           "without synchronising gradients. Start one process: fourbit train CONFIG.yaml.")
    os.makedirs(cfg.output, exist_ok=True)
    planned = check_fits(cfg, force=force, device=resolve_device(cfg.train.device))  # refuse before the slow load
    ck_path = checkpoint_to_resume(cfg, "always" if resume else cfg.train.resume)
    ck = load_checkpoint(ck_path) if ck_path else None           # fail on a broken one before the slow load
    dump_config(cfg, os.path.join(cfg.output, "config.yaml"))
    run = prepare_run(cfg, policy=planned.policy)
    fp = run_fingerprint(run)
    state, pos0 = TrainerState(), 0
    if ck is not None:
        changed = check_compatible(ck.fingerprint, fp, force)
        pos0, state = restore(run, ck, bool(changed)), ck.state
        print(f"resuming from `{ck_path}`: step {state.step}, epoch {state.epoch}, micro-batch "
              f"{state.batch_in_epoch} of the epoch", flush=True)
    total = len(run.plan.steps)
    print(f"{total} optimizer steps ({run.plan.steps_per_epoch} per epoch), effective batch "
          f"{cfg.train.micro_batch_size * cfg.train.grad_accum} rows", flush=True)
    t0 = time.perf_counter()
    metrics = open_metrics(os.path.join(cfg.output, "metrics.jsonl"), pos0 if ck is not None else None)
    try:
        if pos0 < total:
            _train(run, state, pos0, fp, metrics, ck)
        else:
            print(f"the run in `{cfg.output}` is already complete ({total} steps)", flush=True)
        adapter_dir = os.path.join(cfg.output, "adapter")
        save_final(run, adapter_dir)
        if pos0 < total and run.eval_examples and not (cfg.train.eval_every > 0 and total % cfg.train.eval_every == 0):
            ev = evaluate(run, max_batches=cfg.train.eval_max_batches)
            metrics.write(json.dumps({"step": state.step, "batch": total, "eval_loss": _r(ev)}) + "\n")
            if ev is not None:
                print(f"eval loss {ev:.4f}", flush=True)
    finally:
        metrics.close()
    print(f"done in {time.perf_counter() - t0:.0f}s; adapter saved to {adapter_dir}", flush=True)
    return adapter_dir


def _train(run: Run, state: TrainerState, pos0: int, fp: dict, metrics, ck) -> None:
    """Plan steps pos0..end: step, log, checkpoint; stop on signals and on too many bad steps."""
    from tqdm.auto import tqdm
    cfg, t = run.cfg, run.cfg.train
    total, positions = len(run.plan.steps), data_positions(run.plan)
    ex = state.extra
    window = dict(ex.get("window") or {"loss_tok": 0.0, "ntrain": 0, "tokens": 0})
    tokens, in_a_row = int(ex.get("tokens", 0)), int(ex.get("bad_in_a_row", 0))
    last_ckpt = ck.path if ck is not None else None

    def sync_state(done: int) -> None:
        state.epoch, state.batch_in_epoch, state.micro_step = positions[done]
        state.extra.update(plan_step=done, micro_batch_size=run.micro, tokens=tokens, bad_in_a_row=in_a_row,
                           window=dict(window))

    def log(rec: dict) -> None:
        metrics.write(json.dumps(rec) + "\n")
        metrics.flush()

    bar = tqdm(total=total, initial=pos0, desc="train", dynamic_ncols=True, file=sys.stdout)
    t_window = time.perf_counter()
    if ck is not None:
        restore_rng(ck.rng)          # last: nothing done while rebuilding may consume the restored streams
    with guards.StopSignals() as stop:
        for pos in range(pos0, total):
            m = train_step(run, pos)
            done = pos + 1
            tokens += m["tokens"]
            window["tokens"] += m["tokens"]
            if m.get("skipped") == "non-finite loss or gradient":
                state.bad_steps += 1
                in_a_row += 1
                bar.write(guards.bad_step_warning(state.step, pos, run.plan.epoch_of_step[pos],
                                                  [r for mb in run.plan.steps[pos] for r in mb], m["loss"],
                                                  m["grad_norm"]))
                log({"step": state.step, "batch": done, "skipped": m["skipped"], "loss": _r(m["loss"]),
                     "grad_norm": _r(m["grad_norm"])})
                if 0 < t.max_bad_steps <= in_a_row:
                    bar.close()
                    raise guards.too_many_bad_steps(in_a_row, pos - in_a_row + 1, pos, last_ckpt, cfg)
            elif "skipped" in m:
                bar.write(f"warning: batch {done} skipped ({m['skipped']})")
            else:
                in_a_row = 0
                state.step += 1
                state.tokens_seen += m["trainable_tokens"]
                window["loss_tok"] += m["loss"] * m["trainable_tokens"]
                window["ntrain"] += m["trainable_tokens"]
            eval_now = t.eval_every > 0 and done % t.eval_every == 0
            bad = m.get("skipped") == "non-finite loss or gradient"      # logged above; its window goes on
            if (done % t.log_every == 0 and not bad) or done == total or eval_now:
                if run.device.type == "cuda":
                    torch.cuda.synchronize()
                now = time.perf_counter()
                rec = {"step": state.step, "batch": done, "epoch": round(done / run.plan.steps_per_epoch, 3),
                       "loss": _r(window["loss_tok"] / window["ntrain"]) if window["ntrain"] else None,
                       "grad_norm": _r(m.get("grad_norm")), "lr": m.get("lr"), "tokens": tokens,
                       "tokens_per_s": round(window["tokens"] / max(now - t_window, 1e-9), 1)}
                if eval_now:
                    rec["eval_loss"] = _r(evaluate(run, max_batches=t.eval_max_batches))
                log(rec)
                bar.set_postfix(loss=rec["loss"], gnorm=rec["grad_norm"], lr=f"{rec['lr'] or 0:.2e}",
                                tok_s=rec["tokens_per_s"])
                window, t_window = {"loss_tok": 0.0, "ntrain": 0, "tokens": 0}, now
            sync_state(done)
            if stop.signum is not None and done < total:
                bar.close()
                path = save_state(run, state, fp)
                print(f"stopped after step {state.step} (batch {done} of {total}); checkpoint `{path}`. Continue "
                      f"with `fourbit train CONFIG --resume`.", file=sys.stderr, flush=True)
                raise guards.Preempted(stop.signum, path)
            if t.save_every > 0 and (done % t.save_every == 0 or done == total):
                last_ckpt = save_state(run, state, fp)
            bar.update(1)
    bar.close()

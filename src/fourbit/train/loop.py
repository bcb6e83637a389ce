"""The training loop: one optimizer step = `grad_accum` micro-batches, loss normalised by the
trainable tokens of the whole accumulated batch, clipped, guarded against non-finite values.

A reader should be able to follow `train_step` in one sitting; setup lives in `prepare_run`.
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
from ..lora import apply_lora, describe_parameters, lora_parameters, save_adapter
from ..model import load_for_training, resolve_device
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


def _build_optimizer(cfg: Config, params: list, device: torch.device) -> torch.optim.Optimizer:
    t = cfg.train
    kw = dict(lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps, weight_decay=t.weight_decay)
    if t.optimizer == "adamw_torch":
        return torch.optim.AdamW(params, **kw)
    import bitsandbytes as bnb
    if device.type != "cuda":
        print(f"note: {t.optimizer} pages optimizer state only on CUDA; on {device.type} it runs unpaged.",
              file=sys.stderr)
    cls = bnb.optim.PagedAdamW32bit if t.optimizer == "paged_adamw_32bit" else bnb.optim.PagedAdamW8bit
    import warnings
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU")
        return cls(params, **kw)


def prepare_run(cfg: Config) -> Run:
    """Load data, model and LoRA; build optimizer, schedule and the micro-batch plan."""
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
    if cfg.train.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    print(f"LoRA on {len(names)} modules; {describe_parameters(model)}", flush=True)
    params = lora_parameters(model)
    opt = _build_optimizer(cfg, params, device)
    total = len(plan.steps)
    warm = warmup_steps(total, cfg.train.warmup_ratio, cfg.train.warmup_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, total, warm, cfg.train.schedule, cfg.train.min_lr_ratio))
    return Run(cfg, model, tok, device, rows, examples, eval_examples, opt, sched, plan, params, collate, report)


def micro_batch(run: Run, row_ids: list[int]) -> dict:
    """Collate rows into device tensors (packed rows hold several examples)."""
    pad = run.tokenizer.pad_token_id
    if run.cfg.data.packing:
        groups = [run.train_rows[i] for i in row_ids]
        batch = run.collate(run.examples, pad, packed_groups=groups, max_length=run.cfg.data.max_length)
    else:
        batch = run.collate([run.examples[i] for i in row_ids], pad)
    return {k: v.to(run.device, non_blocking=True) for k, v in batch.items()}


def count_trainable(batch: dict) -> int:
    return int((batch["labels"][:, 1:] != IGNORE).sum())


def train_step(run: Run, step: int) -> dict:
    """One optimizer step over the plan's micro-batches for `step`. Returns its metrics.

    The loss of each micro-batch is its CE *sum* divided by the trainable tokens of the whole
    accumulated batch, so the gradient equals that of one big batch whatever the split.
    """
    batches = [micro_batch(run, ids) for ids in run.plan.steps[step]]
    n_train = sum(count_trainable(b) for b in batches)            # trainable tokens in the accumulated batch
    n_tokens = sum(int(b["attention_mask"].sum()) if b.get("attention_mask") is not None and b["attention_mask"].dim() == 2
                   else int(b["input_ids"].numel()) for b in batches)
    if n_train == 0:
        return {"skipped": "no trainable tokens", "tokens": n_tokens, "trainable_tokens": 0}
    loss_sum = 0.0
    for b in batches:
        ls, n = causal_lm_loss(run.model, b)
        if n:
            (ls / n_train).backward()
            loss_sum += float(ls.detach())
    max_norm = run.cfg.train.max_grad_norm
    gnorm = torch.nn.utils.clip_grad_norm_(run.params, max_norm if max_norm > 0 else float("inf"))
    gnorm = float(gnorm)
    loss = loss_sum / n_train
    if not (math.isfinite(loss) and math.isfinite(gnorm)):
        run.optimizer.zero_grad(set_to_none=True)                 # the step is not applied
        return {"skipped": "non-finite loss or gradient", "loss": loss, "grad_norm": gnorm,
                "tokens": n_tokens, "trainable_tokens": n_train}
    lr = run.optimizer.param_groups[0]["lr"]
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return {"loss": loss, "grad_norm": gnorm, "lr": lr, "tokens": n_tokens, "trainable_tokens": n_train}


@torch.no_grad()
def evaluate(run: Run, examples: Optional[list] = None, max_batches: int = 0) -> Optional[float]:
    """Token-weighted mean CE over the eval set (None without eval data)."""
    examples = run.eval_examples if examples is None else examples
    if not examples:
        return None
    was_training = run.model.training
    run.model.eval()
    total, n_total = 0.0, 0
    bs = run.cfg.train.micro_batch_size
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))  # less padding
    for k, i in enumerate(range(0, len(order), bs)):
        if max_batches and k >= max_batches:
            break
        b = run.collate([examples[j] for j in order[i:i + bs]], run.tokenizer.pad_token_id)
        b = {key: v.to(run.device) for key, v in b.items()}
        ls, n = causal_lm_loss(run.model, b)
        total += float(ls)
        n_total += n
    run.model.train(was_training)
    return total / n_total if n_total else None


def save_final(run: Run, out_dir: str) -> None:
    quant = to_dict(run.cfg.quant) if run.cfg.quant.bits else None
    save_adapter(run.model, out_dir, run.cfg.lora, run.cfg.model, quant)
    run.tokenizer.save_pretrained(out_dir)


def run_training(cfg: Config, resume: bool = False, force: bool = False) -> str:
    """`fourbit train`: the whole run. Returns the adapter folder."""
    from tqdm.auto import tqdm
    os.makedirs(cfg.output, exist_ok=True)
    dump_config(cfg, os.path.join(cfg.output, "config.yaml"))
    run = prepare_run(cfg)
    total = len(run.plan.steps)
    print(f"{total} optimizer steps ({run.plan.steps_per_epoch} per epoch), effective batch "
          f"{cfg.train.micro_batch_size * cfg.train.grad_accum} rows", flush=True)
    metrics_path = os.path.join(cfg.output, "metrics.jsonl")
    metrics = open(metrics_path, "a", encoding="utf-8")
    bar = tqdm(total=total, desc="train", dynamic_ncols=True, file=sys.stdout)
    t0 = time.perf_counter()
    window = {"loss_tok": 0.0, "ntrain": 0, "tokens": 0, "t": t0}
    tokens_seen = 0
    for step in range(total):
        m = train_step(run, step)
        if "skipped" in m:
            bar.write(f"warning: step {step + 1} skipped ({m['skipped']})")
        else:
            window["loss_tok"] += m["loss"] * m["trainable_tokens"]
            window["ntrain"] += m["trainable_tokens"]
        window["tokens"] += m["tokens"]
        tokens_seen += m["tokens"]
        done = step + 1
        eval_now = cfg.train.eval_every > 0 and done % cfg.train.eval_every == 0
        if done % cfg.train.log_every == 0 or done == total or eval_now:
            if run.device.type == "cuda":
                torch.cuda.synchronize()
            now = time.perf_counter()
            rec = {"step": done, "epoch": round(done / run.plan.steps_per_epoch, 3),
                   "loss": round(window["loss_tok"] / window["ntrain"], 5) if window["ntrain"] else None,
                   "grad_norm": round(m.get("grad_norm", float("nan")), 5), "lr": m.get("lr"),
                   "tokens": tokens_seen, "tokens_per_s": round(window["tokens"] / max(now - window["t"], 1e-9), 1)}
            if eval_now:
                rec["eval_loss"] = round(evaluate(run, max_batches=cfg.train.eval_max_batches) or float("nan"), 5)
            metrics.write(json.dumps(rec) + "\n")
            metrics.flush()
            bar.set_postfix(loss=rec["loss"], gnorm=rec["grad_norm"], lr=f"{rec['lr'] or 0:.2e}",
                            tok_s=rec["tokens_per_s"])
            window = {"loss_tok": 0.0, "ntrain": 0, "tokens": 0, "t": now}
        if cfg.train.save_every > 0 and done % cfg.train.save_every == 0 and done < total:
            save_final(run, os.path.join(cfg.output, "checkpoints", f"step-{done}", "adapter"))
        bar.update(1)
    bar.close()
    adapter_dir = os.path.join(cfg.output, "adapter")
    save_final(run, adapter_dir)
    if run.eval_examples and not (cfg.train.eval_every > 0 and total % cfg.train.eval_every == 0):
        ev = evaluate(run, max_batches=cfg.train.eval_max_batches)
        metrics.write(json.dumps({"step": total, "eval_loss": round(ev, 5)}) + "\n")
        print(f"eval loss {ev:.4f}", flush=True)
    metrics.close()
    print(f"done in {time.perf_counter() - t0:.0f}s; adapter saved to {adapter_dir}", flush=True)
    return adapter_dir

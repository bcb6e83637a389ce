"""Measure what `fourbit plan` predicts: one training configuration, peak memory, in this process.

Used by `benchmarks/memory_plan.py` (one fresh subprocess per shape) and by tests/test_plan.py.
The step is `fourbit train`'s own, not a copy of it: `prepare` sets the model up with the calls
`train.loop.prepare_run` makes (LoRA, `apply_checkpointing` with layers fused on CUDA only, one
flat adapter buffer `FlatLoRA` unless the optimizer is paged_adamw_8bit, `_build_optimizer`) and
returns a `train.loop.Run`; `one_step` runs `train.loop._accumulate_and_step` on it (collate, H2D
copy, `causal_lm_loss`, backward, `FlatLoRA.gather_grads`, clip, optimizer step, `_zero_grad`)
over synthetic full-length rows (every label trained, no padding: no attention mask). Random
models of named shapes are built on the `meta` device and quantized one linear at a time on the
target device, so a 70B shape never exists in 16 bits (the same builder the throughput benchmark uses).
"""
from __future__ import annotations

import torch


def random_nf4_model(shape: str, device: torch.device, seed: int = 0, overrides: dict | None = None):
    """A frozen random model of a named shape, NF4 + double quant, built layer by layer on `device`
    (`fourbit.shapes.build_random_model`, the same builder the throughput benchmark uses)."""
    from .shapes import build_random_model
    return build_random_model(shape, device, seed=seed, config_overrides=overrides)


def prepare(model, cfg, policy: str):
    """Set `model` up for training as `prepare_run` does and return the `train.loop.Run` of one step.

    LoRA (applied once per model; later calls reuse it), then `loop.setup_training`, the same call
    prepare_run makes: the checkpointing `policy` ("off" when `train.grad_checkpointing` is false),
    `FlatLoRA` unless the optimizer is paged_adamw_8bit, the optimizer and its per-step cast cache.
    The data fields of the Run are filled per step by `one_step`.
    """
    from .lora import LoRALinear, apply_lora
    from .train.loop import Plan, Run, setup_training
    from .data import collate
    device = next(p for p in model.parameters()).device
    if not any(isinstance(m, LoRALinear) for m in model.modules()):
        apply_lora(model, cfg.lora, seed=cfg.train.seed)
    for m in model.modules():                  # a reused model takes this config's dropout (as apply_lora would)
        if isinstance(m, LoRALinear) and getattr(m.lora_dropout, "p", 0.0) != cfg.lora.dropout:
            m.set_dropout(cfg.lora.dropout)
    policy = policy if cfg.train.grad_checkpointing else "off"
    _, flat, params, opt = setup_training(model, cfg, policy, device)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    tok = type("Tok", (), {"pad_token_id": 0})()
    return Run(cfg, model, tok, device, [], [], [], opt, sched, Plan([], [], 1), params, collate,
               micro=cfg.train.micro_batch_size, flat=flat)


def zero_step(run) -> None:
    """One optimizer step with zero gradients: creates AdamW's states and changes no weight (no decay)."""
    from .train.loop import _zero_grad
    for p in run.params:
        p.grad = torch.zeros_like(p)
    run.optimizer.step()
    _zero_grad(run)


def one_step(run, micro: int, seq: int, seed: int = 0) -> float:
    """`_accumulate_and_step` (fourbit train's optimizer step, grad_accum 1) on `micro` random rows
    of `seq` tokens, all trained; returns the mean loss."""
    from .data.report import Example
    from .train.loop import Plan, _accumulate_and_step
    vocab = run.model.config.vocab_size
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (micro, seq), generator=g).tolist()
    run.examples = [Example(r, list(r)) for r in ids]
    run.train_rows = list(range(micro))
    run.plan = Plan([[list(range(micro))]], [0], 1)
    run.micro = micro
    m = _accumulate_and_step(run, 0)
    if run.device.type == "cuda":
        torch.cuda.synchronize()
    if "skipped" in m:
        raise RuntimeError(f"the calibration step was skipped: {m}")
    return m["loss"]

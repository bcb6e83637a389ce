"""Measure what `fourbit plan` predicts: one training configuration, peak memory, in this process.

Used by `benchmarks/memory_plan.py` (one fresh subprocess per shape) and by tests/test_plan.py.
The step is fourbit's own: NF4 base (bitsandbytes), our `LoRALinear`, `causal_lm_loss` (chunked
LM-head cross-entropy), fourbit.train.activations' checkpointing policies as `prepare_run` applies them, and the
configured optimizer, over synthetic full-length rows. Random models of named shapes are built on
the `meta` device and quantized one linear at a time on the target device, so a 70B shape never
exists in 16 bits (the same method as fourbit.shapes, which the throughput benchmark uses).
"""
from __future__ import annotations

import torch


def random_nf4_model(shape: str, device: torch.device, seed: int = 0, overrides: dict | None = None):
    """A frozen random model of a named shape, NF4 + double quant, built layer by layer on `device`
    (`fourbit.shapes.build_random_model`, the same builder the throughput benchmark uses)."""
    from .shapes import build_random_model
    return build_random_model(shape, device, seed=seed, config_overrides=overrides)


def prepare(model, cfg, policy: str) -> dict:
    """LoRA (once per model), checkpointing per `policy`, a fresh optimizer over the per-layer tensors.

    This is the training step the memory table in benchmarks/RESULTS.md was measured on; `prepare_run`
    has since moved to one flat adapter buffer and fuses layers on CUDA only, which this does not
    mirror yet.
    """
    from .lora import LoRALinear, apply_lora, lora_parameters
    from .train.activations import apply_checkpointing
    from .train.loop import _build_optimizer
    device = next(p for p in model.parameters()).device
    if not any(isinstance(m, LoRALinear) for m in model.modules()):
        apply_lora(model, cfg.lora, seed=cfg.train.seed)
    apply_checkpointing(model, policy)            # off / full / offload, with apply_checkpointing's fusion
    model.train()
    params = lora_parameters(model)
    for p in params:
        p.grad = None
    return {"model": model, "params": params, "opt": _build_optimizer(cfg, params, device), "device": device}


def zero_step(run: dict) -> None:
    """One optimizer step with zero gradients: creates AdamW's states and changes no weight (no decay)."""
    import torch
    for p in run["params"]:
        p.grad = torch.zeros_like(p)
    run["opt"].step()
    run["opt"].zero_grad(set_to_none=True)


def one_step(run: dict, micro: int, seq: int, seed: int = 0) -> float:
    """Forward + backward + clip + step on `micro` random rows of `seq` tokens; returns the mean loss."""
    import torch
    from .train.loss import causal_lm_loss
    model, device = run["model"], run["device"]
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (micro, seq), generator=g).to(device)
    ls, n = causal_lm_loss(model, {"input_ids": ids, "labels": ids})
    (ls / n).backward()
    torch.nn.utils.clip_grad_norm_(run["params"], 0.3)
    run["opt"].step()
    run["opt"].zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return float(ls) / n

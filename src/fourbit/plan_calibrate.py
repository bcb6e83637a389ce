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
import torch.nn as nn


def random_nf4_model(mcfg, device: torch.device, seed: int = 0, quant: bool = True):
    """A frozen LlamaForCausalLM-like model of transformers config `mcfg`, NF4 + double quant, random weights."""
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM
    mcfg._attn_implementation = "sdpa"
    mcfg.use_cache = False
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(mcfg, dtype=torch.bfloat16)
    head = model.get_output_embeddings()
    gen = torch.Generator(device=device).manual_seed(seed)

    def draw(shape):
        return (torch.randn(shape, device=device, dtype=torch.bfloat16, generator=gen) * 0.02)

    for name, mod in list(model.named_modules()):
        if isinstance(mod, nn.Linear) and mod is not head:
            w = draw((mod.out_features, mod.in_features))
            if quant:
                new = bnb.nn.Linear4bit(mod.in_features, mod.out_features, bias=False, compute_dtype=torch.bfloat16,
                                        compress_statistics=True, quant_type="nf4", quant_storage=torch.uint8,
                                        device="meta")
                new.weight = bnb.nn.Params4bit(w, requires_grad=False, **new.weight.__dict__).to(device)
            else:
                new = nn.Linear(mod.in_features, mod.out_features, bias=False, device="meta")
                new.weight = nn.Parameter(w, requires_grad=False)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, new)
            del w
    for mname, mod in list(model.named_modules()):
        for pname, p in list(mod.named_parameters(recurse=False)):
            if p.device.type == "meta":
                t = torch.ones(p.shape, dtype=torch.bfloat16, device=device) if "norm" in mname else draw(p.shape)
                setattr(mod, pname, nn.Parameter(t, requires_grad=False))
        if any(b.device.type == "meta" for b in mod.buffers(recurse=False)):   # rotary inv_freq
            with torch.device(device):
                fresh = type(mod)(config=mcfg)
            for bname, b in fresh.named_buffers(recurse=False):
                setattr(mod, bname, b)
    if getattr(mcfg, "tie_word_embeddings", False):
        model.lm_head.weight = model.get_input_embeddings().weight
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.device.type == "meta"]
    if left:
        raise RuntimeError(f"tensors left on the meta device: {left[:5]}")
    model.train()
    return model


def prepare(model, cfg, policy: str) -> dict:
    """LoRA (once per model), checkpointing per `policy`, a fresh optimizer: what `prepare_run` does."""
    from .lora import LoRALinear, apply_lora, lora_parameters
    from .train.activations import apply_checkpointing
    from .train.loop import _build_optimizer
    device = next(p for p in model.parameters()).device
    if not any(isinstance(m, LoRALinear) for m in model.modules()):
        apply_lora(model, cfg.lora, seed=cfg.train.seed)
    apply_checkpointing(model, policy)            # what prepare_run does (off / full / offload)
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

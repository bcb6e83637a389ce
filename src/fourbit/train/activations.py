"""Activation checkpointing as a policy over the decoder layers: off, full, offload, or auto.

- off: autograd keeps every layer's activations (fastest; memory grows with layers x tokens).
- full: each decoder layer runs under `torch.utils.checkpoint` (non-reentrant); only its inputs
  stay on the GPU and the layer is recomputed in backward (about +1/3 of the step's FLOPs).
- offload: as full, but the layer input (the residual stream, (B, T, H)) is copied to pinned CPU
  memory on a side stream as soon as the layer has run, and copied back one layer ahead in backward,
  so GPU memory no longer grows with the number of layers.
- auto: the fastest policy whose predicted peak fits the memory budget (`choose_policy`).

Layers are wrapped per instance (each layer's `forward` is replaced on that object only), so the
module tree, parameter names and adapter files are unchanged and no library class is patched.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

POLICIES = ("off", "full", "offload")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    dec = model.get_decoder() if hasattr(model, "get_decoder") else model
    layers = getattr(dec, "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no decoder `layers` to checkpoint")
    return layers


def layer_activation_bytes(cfg, tokens: int, bytes_per: int = 2) -> int:
    """Rough bytes autograd keeps for one Llama-style decoder layer without checkpointing.

    Saved per token: about 8 hidden-size tensors (norm inputs/outputs, q, attention output, o_proj
    input, residuals) and 4 intermediate-size ones (gate, up, act(gate), act*up). A prediction for
    choosing a policy, checked against the measured peaks in benchmarks/NOTES.md."""
    h, i = cfg.hidden_size, cfg.intermediate_size
    return tokens * bytes_per * (8 * h + 4 * i)


def choose_policy(cfg, tokens: int, budget_bytes: int, resident_bytes: int, workspace_bytes: int = 0) -> str:
    """The fastest policy whose predicted peak fits `budget_bytes`.

    Args:
        cfg: the model config (hidden_size, intermediate_size, num_hidden_layers).
        tokens: tokens per micro-batch (B * T).
        resident_bytes: weights + LoRA + optimizer state already allocated.
        workspace_bytes: transient peak outside the layers (LM-head chunks, ...).
    """
    layers = cfg.num_hidden_layers
    one = layer_activation_bytes(cfg, tokens)
    inputs = tokens * cfg.hidden_size * 2
    base = resident_bytes + workspace_bytes
    if base + layers * one <= budget_bytes:
        return "off"
    if base + layers * inputs + one <= budget_bytes:
        return "full"
    return "offload"


class _Offloader:
    """Moves layer inputs to pinned CPU buffers (reused across steps) and back, one layer ahead."""

    def __init__(self, device: torch.device):
        self.stream = torch.cuda.Stream(device)
        self.cpu: dict[int, torch.Tensor] = {}
        self.ready: dict[int, torch.cuda.Event] = {}
        self.prefetched: dict[int, tuple[torch.Tensor, torch.cuda.Event]] = {}

    def save(self, idx: int, t: torch.Tensor) -> None:
        buf = self.cpu.get(idx)
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
            buf = self.cpu[idx] = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        self.stream.wait_stream(torch.cuda.current_stream(t.device))   # t is ready
        with torch.cuda.stream(self.stream):
            buf.copy_(t, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(self.stream)
        t.record_stream(self.stream)                                    # not reused before the copy ends
        self.ready[idx] = ev

    def _fetch(self, idx: int, device: torch.device):
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(self.ready[idx])
            g = torch.empty(self.cpu[idx].shape, dtype=self.cpu[idx].dtype, device=device)
            g.copy_(self.cpu[idx], non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(self.stream)
        return g, ev

    def load(self, idx: int, device: torch.device) -> torch.Tensor:
        g, ev = self.prefetched.pop(idx, None) or self._fetch(idx, device)
        if idx - 1 in self.cpu and idx - 1 not in self.prefetched:
            self.prefetched[idx - 1] = self._fetch(idx - 1, device)   # next layer backward needs it
        cur = torch.cuda.current_stream(device)
        cur.wait_event(ev)
        g.record_stream(cur)
        return g


class _OffloadedLayer(torch.autograd.Function):
    """Run a layer without saving anything but its input, which goes to CPU; recompute in backward."""

    @staticmethod
    def forward(ctx, anchor, hidden, run: Callable, off: _Offloader, idx: int):
        # anchor: an empty tensor requiring grad, so the node exists even when `hidden` needs no grad
        ctx.run, ctx.off, ctx.idx, ctx.device = run, off, idx, hidden.device
        ctx.hidden_grad = hidden.requires_grad
        ctx.rng = torch.cuda.get_rng_state(hidden.device)
        with torch.no_grad():
            out = run(hidden)
        off.save(idx, hidden)
        return out

    @staticmethod
    def backward(ctx, gout):
        h = ctx.off.load(ctx.idx, ctx.device).requires_grad_(ctx.hidden_grad)
        with torch.random.fork_rng(devices=[ctx.device]):
            torch.cuda.set_rng_state(ctx.rng, ctx.device)
            with torch.enable_grad():
                out = ctx.run(h)
        torch.autograd.backward(out, gout)
        return None, (h.grad if ctx.hidden_grad else None), None, None, None


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _wrap(layer: nn.Module, policy: str, idx: int, off: Optional[_Offloader]) -> None:
    orig = layer.__dict__.get("_fourbit_orig_forward") or layer.forward
    layer._fourbit_orig_forward = orig

    def forward(hidden_states, *args, **kwargs):
        if not (torch.is_grad_enabled() and layer.training):
            return orig(hidden_states, *args, **kwargs)
        if policy == "full":
            return checkpoint(orig, hidden_states, *args, use_reentrant=False, **kwargs)
        if not hidden_states.is_cuda:       # offloading needs CUDA streams; CPU falls back to full
            return checkpoint(orig, hidden_states, *args, use_reentrant=False, **kwargs)
        tup = [False]

        def run(h):
            o = orig(h, *args, **kwargs)
            tup[0] = isinstance(o, tuple)
            return _first(o)
        anchor = layer._fourbit_anchor
        if anchor.device != hidden_states.device:
            anchor = layer._fourbit_anchor = torch.empty(0, device=hidden_states.device, requires_grad=True)
        out = _OffloadedLayer.apply(anchor, hidden_states, run, off, idx)
        return (out,) if tup[0] else out

    layer._fourbit_anchor = torch.empty(0, requires_grad=True)
    layer.forward = forward


def _is_silu(act) -> bool:
    return isinstance(act, nn.SiLU) or type(act).__name__ in ("SiLUActivation", "SiLU")


_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm")


def fuse_layers(model: nn.Module) -> int:
    """Swap Llama-style RMSNorms for `FusedRMSNorm` and run SiLU-gated MLPs through the fused SwiGLU;
    group LoRA q/k/v and gate/up (`lora.LoRAGroup`: one NF4 dequant buffer and one GEMM per group on
    the GPU fast path; the gate/up output goes whole into `swiglu_packed`). Call after `apply_lora`.

    Both keep fewer activations (no fp32 copies in the norm, no silu(g) tensor) and run fewer
    kernels; both fall back to the torch reference off CUDA. Instances are swapped or given their
    own forward, parameter names stay. Idempotent. Returns the number of modules changed.
    """
    from ..kernels.rmsnorm import FusedRMSNorm
    from ..kernels.swiglu import swiglu, swiglu_packed
    from ..lora import group_lora
    n = 0
    for name, mod in list(model.named_modules()):
        if all(hasattr(mod, k) for k in ("q_proj", "k_proj", "v_proj")):
            grp = group_lora([mod.q_proj, mod.k_proj, mod.v_proj])     # q/k/v: one dequant buffer, one GEMM
            if grp is not None and "_fourbit_group" not in mod.q_proj.__dict__:
                for m in grp.members:
                    m.__dict__["_fourbit_group"] = grp
                n += 1
        if type(mod).__name__ in _NORMS and not mod.weight.requires_grad:
            parent, _, child = name.rpartition(".")
            fused = FusedRMSNorm(mod.weight, mod.variance_epsilon)
            fused.__dict__["_fourbit_orig"] = mod                  # not a submodule: names stay
            setattr(model.get_submodule(parent) if parent else model, child, fused)
            n += 1
        elif (all(hasattr(mod, k) for k in ("gate_proj", "up_proj", "down_proj"))
              and _is_silu(getattr(mod, "act_fn", None)) and "forward" not in mod.__dict__):
            grp = group_lora([mod.gate_proj, mod.up_proj])           # gate/up: one GEMM, SwiGLU reads it whole

            def forward(x, _m=mod, _g=grp):
                gu = _g.fused(x) if _g is not None else None
                if gu is not None:
                    return _m.down_proj(swiglu_packed(gu))
                return _m.down_proj(swiglu(_m.gate_proj(x), _m.up_proj(x)))
            mod.forward = forward
            n += 1
    return n


def unfuse_layers(model: nn.Module) -> None:
    """Undo `fuse_layers`."""
    for name, mod in list(model.named_modules()):
        mod.__dict__.pop("_fourbit_group", None)
        if "_fourbit_orig" in mod.__dict__:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, mod.__dict__["_fourbit_orig"])
        elif "forward" in mod.__dict__ and hasattr(mod, "down_proj"):
            del mod.__dict__["forward"]


def apply_checkpointing(model: nn.Module, policy: str = "full", budget_bytes: Optional[int] = None,
                        tokens: Optional[int] = None, fuse: bool = True) -> str:
    """Wrap the decoder layers of `model` with a checkpointing policy. Returns the policy applied.

    Args:
        policy: off | full | offload | auto (auto needs `tokens`; the budget defaults to the
            device's total memory, and resident bytes are what is allocated now).
        fuse: also `fuse_layers` (fewer saved activations; same math within bf16 rounding).
    """
    layers = decoder_layers(model)
    if fuse:
        fuse_layers(model)
    if policy == "auto":
        if tokens is None:
            raise ValueError("policy 'auto' needs tokens (per micro-batch)")
        dev = next(model.parameters()).device
        if dev.type == "cuda":
            budget = budget_bytes or torch.cuda.get_device_properties(dev).total_memory
            resident = torch.cuda.memory_allocated(dev)
        else:                                   # CPU: recompute, as before policies existed
            return apply_checkpointing(model, "full")
        cfg = model.config
        work = tokens * cfg.hidden_size * 2 * 4 + 1024 * cfg.vocab_size * 6     # hidden/grad copies + CE chunk
        policy = choose_policy(cfg, tokens, budget, resident, work)
    if policy not in POLICIES:
        raise ValueError(f"checkpointing policy must be one of {POLICIES + ('auto',)}, got {policy!r}")
    remove_checkpointing(model)
    if policy == "off":
        return policy
    dev = next(model.parameters()).device
    off = _Offloader(dev) if policy == "offload" and dev.type == "cuda" else None
    for i, layer in enumerate(layers):
        _wrap(layer, policy, i, off)
    return policy


def remove_checkpointing(model: nn.Module) -> None:
    """Undo `apply_checkpointing` (layers run their own forward again)."""
    for layer in decoder_layers(model):
        if "_fourbit_orig_forward" in layer.__dict__:
            del layer.__dict__["forward"]
            del layer.__dict__["_fourbit_orig_forward"]

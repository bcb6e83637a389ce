"""Activation checkpointing as a policy over the decoder layers: keep, off, selective, full, offload, or auto.

- keep: as off, and the GPU fast path also keeps each adapted linear's dequantized bf16 base weight
  from forward to backward instead of dequantizing it a second time (fastest; + 2 bytes a base
  weight, ~13.6 GiB at Llama-3-8B). On CPU, where there is no fast path, keep runs as off.
- off: autograd keeps every layer's activations (memory grows with layers x tokens).
- full: each decoder layer runs without autograd (`_OffloadedLayer` with its input kept in place);
  only its input stays on the device and the whole layer is recomputed in backward (about +1/3 of
  the step's FLOPs). (Not `torch.utils.checkpoint`: its forward runs in grad mode, and on CPU the
  heap then grew ~75 MB a layer at SmolLM2 2x2048, 3.06 vs 1.88 GiB peak RSS, same speed.)
- selective: Llama-style layers (`SPLIT_LAYERS`) keep two tensors, the layer input x and the
  residual after attention h = x + attn(norm1(x)), and backward recomputes each branch on its own:
  the MLP branch from h, then the attention branch from x. The two output projections (o_proj,
  down_proj) are not run again: their outputs only carry a gradient back, and their backward needs
  only their input (`LoRALinear`'s `_fourbit_no_forward`). That skips about a third of the
  recompute GEMM FLOPs, and only one branch's activations are alive at a time. Other layers: `full`.
- offload: as selective, with x and h copied to pinned CPU memory on a side stream as soon as they
  exist and fetched back one tensor ahead in backward, so device memory no longer grows with the
  number of layers. On CPU there is nothing to move: offload is selective.
- auto: resolved before this module sees it, by the memory plan (`fourbit.plan`): the fastest
  policy whose predicted peak fits (`train.loop.setup_training`, `fourbit bench`).

Layers are wrapped per instance (each layer's `forward` is replaced on that object only), so the
module tree, parameter names and adapter files are unchanged and no library class is patched.
"""
from __future__ import annotations

import inspect
from contextlib import contextmanager
from typing import Callable

import torch
import torch.nn as nn

from ..switches import Switches

POLICIES = ("keep", "off", "selective", "full", "offload")
# decoder layers whose forward is exactly h = x + self_attn(input_layernorm(x))[0];
# out = h + mlp(post_attention_layernorm(h)) (read in transformers 5.17 and 5.24)
SPLIT_LAYERS = ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    dec = model.get_decoder() if hasattr(model, "get_decoder") else model
    layers = getattr(dec, "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no decoder `layers` to checkpoint")
    return layers


class _Keep:
    """Saved tensors kept where they are (selective; offload on CPU, where host memory is the device's).
    `save` returns the handle `load` takes (here the tensor itself)."""

    def save(self, key, t: torch.Tensor) -> torch.Tensor:
        return t

    def load(self, handle: torch.Tensor, device: torch.device) -> torch.Tensor:
        return handle


class _Offloader:
    """Moves saved tensors to pinned CPU buffers (reused across steps) and back, one tensor ahead.

    Keys are saved in forward order and loaded in reverse, so each load prefetches the key saved
    just before it (the next one backward needs)."""

    def __init__(self, device: torch.device):
        self.stream = torch.cuda.Stream(device)
        self.cpu: dict = {}
        self.ready: dict = {}
        self.prefetched: dict = {}
        self.prev: dict = {}                       # key -> the key saved before it
        self._last = None

    def save(self, key, t: torch.Tensor):
        """Start the copy of t to host memory; returns the handle for `load` (the key)."""
        buf = self.cpu.get(key)
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
            buf = self.cpu[key] = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        self.stream.wait_stream(torch.cuda.current_stream(t.device))   # t is ready
        with torch.cuda.stream(self.stream):
            buf.copy_(t, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(self.stream)
        t.record_stream(self.stream)                                    # not reused before the copy ends
        self.ready[key] = ev
        if key != self._last:
            self.prev[key] = self._last
        self._last = key
        return key

    def _fetch(self, key, device: torch.device):
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(self.ready[key])
            g = torch.empty(self.cpu[key].shape, dtype=self.cpu[key].dtype, device=device)
            g.copy_(self.cpu[key], non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(self.stream)
        return g, ev

    def load(self, key, device: torch.device) -> torch.Tensor:
        g, ev = self.prefetched.pop(key, None) or self._fetch(key, device)
        nxt = self.prev.get(key)
        if nxt is not None and nxt in self.cpu and nxt not in self.prefetched:
            self.prefetched[nxt] = self._fetch(nxt, device)           # what backward needs next
        cur = torch.cuda.current_stream(device)
        cur.wait_event(ev)
        g.record_stream(cur)
        self._last = None                                             # the next forward starts a new chain
        return g


def _rng_state(device: torch.device):
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


@contextmanager
def _rng_restored(device: torch.device, state):
    """Run with the RNG as it was (dropout masks repeat in the recompute); the RNG is unchanged after."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        if device.type == "cuda":
            torch.cuda.set_rng_state(state, device)
        else:
            torch.set_rng_state(state)
        yield


class _OffloadedLayer(torch.autograd.Function):
    """Run a layer without saving anything but its input, which goes to the store; recompute the whole
    layer in backward (`full`, and selective/offload for layers that cannot be split: `_SplitLayer`)."""

    @staticmethod
    def forward(ctx, anchor, hidden, run: Callable, store, key):
        # anchor: an empty tensor requiring grad, so the node exists even when `hidden` needs no grad
        ctx.run, ctx.store, ctx.device = run, store, hidden.device
        ctx.hidden_grad = hidden.requires_grad
        ctx.rng = _rng_state(hidden.device)
        with torch.no_grad():
            out = run(hidden)
        ctx.saved = store.save(key, hidden)
        return out

    @staticmethod
    def backward(ctx, gout):
        h = ctx.store.load(ctx.saved, ctx.device).detach().requires_grad_(ctx.hidden_grad)
        with _rng_restored(ctx.device, ctx.rng), torch.enable_grad():
            out = ctx.run(h)
        torch.autograd.backward(out, gout)
        return None, (h.grad if ctx.hidden_grad else None), None, None, None


@contextmanager
def _no_forward(mods: tuple):
    """LoRALinears in `mods` skip their frozen GEMM's forward (their outputs only carry gradients back)."""
    for m in mods:
        m.__dict__["_fourbit_no_forward"] = True
    try:
        yield
    finally:
        for m in mods:
            m.__dict__.pop("_fourbit_no_forward", None)


class _SplitLayer(torch.autograd.Function):
    """A Llama-style layer, out = h + mlp(h), h = x + attn(x), saving only x and h (in `store`).

    backward(gout): recompute the MLP branch from h and backpropagate gout through it (dh = gout +
    its input grad), then the attention branch from x (dx = dh + its input grad). `final` are the
    branches' last linears (o_proj, down_proj): in the recompute they run backward-only.
    """

    @staticmethod
    def forward(ctx, anchor, x, attn: Callable, mlp: Callable, final: tuple, store, idx: int):
        ctx.attn, ctx.mlp, ctx.final, ctx.store, ctx.device = attn, mlp, final, store, x.device
        ctx.x_grad = x.requires_grad
        with torch.no_grad():
            ctx.rng_attn = _rng_state(x.device)
            ctx.saved_x = store.save((idx, 0), x)
            h = x + attn(x)
            ctx.rng_mlp = _rng_state(x.device)
            ctx.saved_h = store.save((idx, 1), h)
            out = h + mlp(h)
        return out

    @staticmethod
    def backward(ctx, gout):
        dev = ctx.device
        h = ctx.store.load(ctx.saved_h, dev).detach().requires_grad_(True)
        with _rng_restored(dev, ctx.rng_mlp), torch.enable_grad(), _no_forward(ctx.final):
            m = ctx.mlp(h)
        torch.autograd.backward(m, gout)
        dh = h.grad.add_(gout)
        del h, m
        # x needs no grad for the first layer (frozen embeddings); the anchor keeps this node alive
        x = ctx.store.load(ctx.saved_x, dev).detach().requires_grad_(ctx.x_grad)
        ctx.saved_x = ctx.saved_h = None
        with _rng_restored(dev, ctx.rng_attn), torch.enable_grad(), _no_forward(ctx.final):
            a = ctx.attn(x)
        if a.requires_grad:
            torch.autograd.backward(a, dh)
        dx = (x.grad.add_(dh) if x.grad is not None else dh) if ctx.x_grad else None
        return None, dx, None, None, None, None, None


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def splittable(layer: nn.Module) -> bool:
    """True when `layer` is a decoder layer `_SplitLayer` knows (see SPLIT_LAYERS)."""
    return (type(layer).__name__ in SPLIT_LAYERS
            and all(hasattr(layer, k) for k in ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")))


def _final_linears(layer: nn.Module) -> tuple:
    from ..lora import LoRALinear
    mods = (getattr(layer.self_attn, "o_proj", None), getattr(layer.mlp, "down_proj", None))
    return tuple(m for m in mods if isinstance(m, LoRALinear))


def _wrap(layer: nn.Module, policy: str, idx: int, store) -> None:
    orig = layer.__dict__.get("_fourbit_orig_forward") or layer.forward
    layer._fourbit_orig_forward = orig
    split = policy in ("selective", "offload") and splittable(layer) and Switches.split
    sig = inspect.signature(orig) if split else None
    final = _final_linears(layer) if split else ()

    def forward(hidden_states, *args, **kwargs):
        if not (torch.is_grad_enabled() and layer.training):
            return orig(hidden_states, *args, **kwargs)
        anchor = layer._fourbit_anchor
        if anchor.device != hidden_states.device:
            anchor = layer._fourbit_anchor = torch.empty(0, device=hidden_states.device, requires_grad=True)
        if split:
            rest = _layer_kwargs(sig, hidden_states, args, kwargs)

            def attn(x):
                return _first(layer.self_attn(hidden_states=layer.input_layernorm(x), **rest))

            def mlp(h):
                return layer.mlp(layer.post_attention_layernorm(h))
            return _SplitLayer.apply(anchor, hidden_states, attn, mlp, final, store, idx)
        tup = [False]

        def run(h):
            o = orig(h, *args, **kwargs)
            tup[0] = isinstance(o, tuple)
            return _first(o)
        out = _OffloadedLayer.apply(anchor, hidden_states, run, store, idx)
        return (out,) if tup[0] else out

    layer._fourbit_anchor = torch.empty(0, requires_grad=True)
    layer.forward = forward


def _layer_kwargs(sig: inspect.Signature, hidden_states, args: tuple, kwargs: dict) -> dict:
    """A decoder layer's call arguments but hidden_states, as keywords (its **kwargs flattened)."""
    if not args:                              # transformers' call: layer(hidden_states, **kw); no binding needed
        return dict(kwargs)
    bound = sig.bind(hidden_states, *args, **kwargs).arguments
    rest = {k: v for k, v in bound.items() if k != "hidden_states"}
    for k, p in sig.parameters.items():
        if p.kind is inspect.Parameter.VAR_KEYWORD and k in rest:
            rest.update(rest.pop(k))
    return rest


def _wrap_add_norm(layer: nn.Module) -> None:
    """`off` / `keep` on a Llama-style layer with fused norms: the same forward, with the mid-layer
    residual add and the MLP's RMSNorm as one kernel each way (`kernels.rmsnorm.add_rmsnorm`; off
    CUDA the same two torch ops as transformers' forward, so CPU tests run this wiring too)."""
    from ..kernels.rmsnorm import FusedRMSNorm, add_rmsnorm
    orig = layer.__dict__.get("_fourbit_orig_forward") or layer.forward
    layer._fourbit_orig_forward = orig
    sig = inspect.signature(orig)

    def forward(hidden_states, *args, **kwargs):
        norm2 = layer.post_attention_layernorm
        if not (Switches.add_norm and isinstance(norm2, FusedRMSNorm) and torch.is_grad_enabled() and layer.training):
            return orig(hidden_states, *args, **kwargs)
        rest = _layer_kwargs(sig, hidden_states, args, kwargs)
        a = _first(layer.self_attn(hidden_states=layer.input_layernorm(hidden_states), **rest))
        h, y = add_rmsnorm(hidden_states, a, norm2)
        return h + layer.mlp(y)
    layer.forward = forward


def _is_silu(act) -> bool:
    return isinstance(act, nn.SiLU) or type(act).__name__ in ("SiLUActivation", "SiLU")


_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm")
# attention modules whose forward is q/k/v -> RoPE -> attention interface -> o_proj, with nothing else
# (Qwen3 normalises q and k first; Qwen2 has biases): `_rope_attention_forward` replaces it
_ROPE_ATTENTION = ("LlamaAttention", "MistralAttention")


def _attention_interface(attn: nn.Module) -> Callable:
    import sys
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    eager = sys.modules[type(attn).__module__].eager_attention_forward
    impl = attn.config._attn_implementation
    if hasattr(ALL_ATTENTION_FUNCTIONS, "get_interface"):
        return ALL_ATTENTION_FUNCTIONS.get_interface(impl, eager)
    return eager if impl in (None, "eager") else ALL_ATTENTION_FUNCTIONS[impl]


def _rope_attention_forward(attn: nn.Module, grp) -> Callable:
    """transformers' Llama/Mistral attention forward with q/k/v from one grouped GEMM and RoPE in one
    kernel (`kernels.rope.rope_qkv`) that writes q, k, v as separate tensors: no rotate_half
    cat/neg/mul/add chains, no split of the group output (whose backward was a cat), and the group
    output is not kept alive by the attention's saved v. Same math; RoPE rounds once, in fp32."""
    from ..kernels.rope import rope_qkv
    orig = attn.forward
    cfg = attn.config
    H, Hkv, D = cfg.num_attention_heads, cfg.num_key_value_heads, attn.head_dim
    extra = {"sliding_window": getattr(cfg, "sliding_window", None)} if type(attn).__name__ == "MistralAttention" else {}

    def forward(hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is not None or position_embeddings is None or not Switches.rope:
            return orig(hidden_states, position_embeddings=position_embeddings, attention_mask=attention_mask, **kwargs)
        kwargs = {k: v for k, v in kwargs.items() if k not in ("cache", "past_key_values")}
        input_shape = hidden_states.shape[:-1]
        qkv = grp.fused(hidden_states) if grp is not None else None
        if qkv is None:                       # dropout, CPU, bias: the three projections, side by side
            qkv = torch.cat([attn.q_proj(hidden_states), attn.k_proj(hidden_states), attn.v_proj(hidden_states)], -1)
        cos, sin = position_embeddings
        q, k, v = rope_qkv(qkv, cos, sin, H, Hkv, D)                    # (B, T, heads, D) each
        del qkv
        out, weights = _attention_interface(attn)(
            attn, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attention_mask,
            dropout=0.0 if not attn.training else attn.attention_dropout, scaling=attn.scaling, **extra, **kwargs)
        out = out.reshape(*input_shape, -1).contiguous()
        return attn.o_proj(out), weights
    return forward


def fuse_layers(model: nn.Module) -> int:
    """Swap Llama-style RMSNorms for `FusedRMSNorm` and run SiLU-gated MLPs through the fused SwiGLU;
    group LoRA q/k/v and gate/up (`lora.LoRAGroup`: one NF4 dequant buffer and one GEMM per group on
    the GPU fast path; the gate/up output goes whole into `swiglu_packed`); Llama/Mistral attention
    takes q/k/v from the group through one RoPE kernel (`_rope_attention_forward`). Call after `apply_lora`.

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
            if type(mod).__name__ in _ROPE_ATTENTION and "forward" not in mod.__dict__:
                mod.forward = _rope_attention_forward(mod, grp)
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
        elif "forward" in mod.__dict__ and (hasattr(mod, "down_proj") or hasattr(mod, "q_proj")):
            del mod.__dict__["forward"]


def apply_checkpointing(model: nn.Module, policy: str = "full", fuse: bool = True) -> str:
    """Wrap the decoder layers of `model` with a checkpointing policy. Returns the policy applied.

    Args:
        policy: keep | off | selective | full | offload (`auto` is the memory plan's to resolve:
            `fourbit.plan.plan(cfg).policy`).
        fuse: also `fuse_layers` (fewer saved activations; same math within bf16 rounding).
    """
    if policy == "auto":
        raise ValueError("checkpointing policy 'auto' is resolved by the memory plan (fourbit.plan.plan(cfg).policy) "
                         "before apply_checkpointing")
    if policy not in POLICIES:
        raise ValueError(f"checkpointing policy must be one of {POLICIES}, got {policy!r}")
    layers = decoder_layers(model)
    if fuse:
        fuse_layers(model)
    remove_checkpointing(model)
    # read by train.loss: the recomputing policies keep the LM-head chunks small (their point is memory)
    model.__dict__["_fourbit_recompute"] = policy not in ("off", "keep")
    if policy == "keep":
        from ..lora import LoRALinear
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.__dict__["_fourbit_keep_w"] = True
    if policy in ("off", "keep"):
        for layer in layers:
            if splittable(layer):
                _wrap_add_norm(layer)
        return policy
    dev = next(model.parameters()).device
    # full, selective, offload on CPU (nothing to move): saved tensors stay where they are
    store = _Offloader(dev) if policy == "offload" and dev.type == "cuda" else _Keep()
    for i, layer in enumerate(layers):
        _wrap(layer, policy, i, store)
    return policy


def remove_checkpointing(model: nn.Module) -> None:
    """Undo `apply_checkpointing` (layers run their own forward again)."""
    model.__dict__.pop("_fourbit_recompute", None)
    for m in model.modules():
        m.__dict__.pop("_fourbit_keep_w", None)
    for layer in decoder_layers(model):
        if "_fourbit_orig_forward" in layer.__dict__:
            del layer.__dict__["forward"]
            del layer.__dict__["_fourbit_orig_forward"]

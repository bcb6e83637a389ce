"""LoRA: our own `LoRALinear` wrapped around a frozen base linear (4-bit or 16-bit).

Why our own layer instead of PEFT's: the frozen 4-bit matmul is an autograd function that
dequantizes the NF4 weight just before use and again in backward, saving nothing but the packed
weight, so no bf16 copy of the weight outlives one matmul; and the fused GPU path (fourbit.kernels)
plugs into the same layer without patching anyone's classes. Parameters and files follow PEFT's
layout, so `peft.PeftModel.from_pretrained` reads what we write and we read what PEFT writes.

    y = base(x) + (alpha / r) * B(A(dropout(x)))      A: (r, in), B: (out, r), B starts at 0
"""
from __future__ import annotations

import json
import math
import os
import re
from typing import Iterable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import LoraConfig
from .errors import FourbitError
from .switches import Switches

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
FOURBIT_SIDECAR = "fourbit_adapter.json"   # our extras (quant settings, modules); PEFT warns on unknown keys
PEFT_PREFIX = "base_model.model."


def is_4bit(module: nn.Module) -> bool:
    w = getattr(module, "weight", None)
    return w is not None and hasattr(w, "quant_state") and w.dtype == torch.uint8


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_4bit(module)


def dequantize(module: nn.Module) -> torch.Tensor:
    """The (out, in) weight of a frozen base linear in its compute dtype."""
    if is_4bit(module):
        from .kernels.nf4 import dequantize_nf4_fast
        if getattr(module.weight.quant_state, "packing_format_for_cpu", False):
            # bitsandbytes repacks a CPU weight for its own kernel the first time Linear4bit runs under
            # no_grad; undo that once so the standard NF4 layout (what we dequantize) is back.
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse
            module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu_inverse(
                module.weight.data, module.weight.quant_state)
        return dequantize_nf4_fast(module.weight.data, module.weight.quant_state)
    return module.weight


class _Frozen4bitMatmul(torch.autograd.Function):
    """y = x @ W^T with W dequantized from NF4 in forward and again in backward (nothing else saved)."""

    @staticmethod
    def forward(ctx, x, base: nn.Module):
        ctx.base = base
        return F.linear(x, dequantize(base).to(x.dtype))

    @staticmethod
    def backward(ctx, gy):
        if not ctx.needs_input_grad[0]:
            return None, None
        w = dequantize(ctx.base).to(gy.dtype)          # (out, in)
        return gy @ w, None                              # (..., in)


# The GPU fast path casts A and s*B to the activation dtype for its matmuls. Inside a training loop
# the weights change only at the optimizer step, so the casts can be made once per step instead of
# in every forward, backward and recompute (at Llama-3-8B: ~740 small kernels a step fewer). The
# cache is opt-in per model (`cache_optimizer_steps`): bitsandbytes' optimizers write the weights
# through raw pointers, which no version counter sees, so the layers get a clock that the optimizer's
# step hook advances. Keys also hold the tensors' version counters and addresses, so torch's own
# in-place updates and re-bound weights refresh it anyway. Layers without a clock never cache.


class _Clock:
    __slots__ = ("gen",)

    def __init__(self):
        self.gen = 0

    def tick(self, *_args) -> None:
        self.gen += 1


class _CacheHandle:
    """Returned by `cache_optimizer_steps`; `remove()` stops caching and drops the cached copies."""

    def __init__(self, hook, model: nn.Module):
        self.hook, self.model = hook, model

    def remove(self) -> None:
        self.hook.remove()
        for m in self.model.modules():
            m.__dict__.pop("_lowp_clock", None)
            m.__dict__.pop("_lowp", None)
            if isinstance(m, LoRALinear) and "_fourbit_group" in m.__dict__:
                m.__dict__["_fourbit_group"]._lowp = None


def cache_optimizer_steps(opt: torch.optim.Optimizer, model: nn.Module) -> _CacheHandle:
    """Cache the low-precision LoRA weights of `model` between the steps of `opt` (see above)."""
    clock = _Clock()
    for m in model.modules():
        if isinstance(m, LoRALinear):
            m.__dict__["_lowp_clock"] = clock
    return _CacheHandle(opt.register_step_post_hook(clock.tick), model)


def _lowp_key(clock: "_Clock", ts, dtype) -> tuple:
    return (clock.gen, dtype, *((t.data_ptr(), t._version) for t in ts))


class _FrozenBackwardOnly(_Frozen4bitMatmul):
    """The frozen base matmul without its forward: returns an uninitialised (..., out) tensor and, in
    backward, dx = gy @ W. For recomputes whose output value is never read (see `LoRALinear`)."""

    @staticmethod
    def forward(ctx, x, base: nn.Module):
        ctx.base = base
        return x.new_empty((*x.shape[:-1], base.out_features))


class FastDropout(nn.Module):
    """Inverted dropout whose CPU mask costs a quarter of the random draws of nn.Dropout.

    On CPU, `bernoulli_` draws ~100M numbers/s and LoRA dropout needs one per input element of every
    adapted layer (a fifth of a SmolLM2 training step). Here one 64-bit random word gives four
    16-bit uniforms; an element is dropped when its uniform falls below round(p * 65536), so the
    drop rate is p to within 1/131072 (0.05 -> 0.0500031), and kept elements are scaled by
    1/(1-p_eff), so the expectation is exact. On CUDA, where random numbers are cheap, this is
    nn.functional.dropout.
    """

    def __init__(self, p: float):
        super().__init__()
        self.p = p
        self.threshold = round(p * 65536)                       # dropped when u16 < threshold
        self.scale = 1.0 / (1.0 - self.threshold / 65536)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        if x.is_cuda:
            return F.dropout(x, self.p, True)
        return self.zero_dropped(x) * self.scale

    def zero_dropped(self, x: torch.Tensor) -> torch.Tensor:
        """x with the dropped elements zeroed but NOT rescaled (one pass; the caller folds `scale` into
        the next weight, which is exact in real arithmetic and saves a pass forward and backward)."""
        n = x.numel()
        words = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_(-2**63, 2**63 - 1)
        u = words.view(torch.int16)[:n].view(x.shape)            # uniform on [-32768, 32767]
        return x.masked_fill(u < (self.threshold - 32768), 0)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class LoRALinear(nn.Module):
    """A frozen base linear plus a trainable low-rank update; PEFT's attribute names.

    LoRA weights are kept in fp32 (the optimizer's master copy) and cast to the activation dtype
    for the matmuls, so tiny updates are not rounded away in bf16.
    """

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False):
        super().__init__()
        self.base_layer = base
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.r, self.alpha = r, alpha
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        dev = base.weight.device
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=dev, dtype=torch.float32)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=dev, dtype=torch.float32)
        self.set_dropout(dropout)
        self.merged = False

    def set_dropout(self, p: float) -> None:
        """Dropout on the adapter's input: `FastDropout(p)`, or none at p = 0."""
        self.lora_dropout = FastDropout(p) if p > 0 else nn.Identity()

    def reset_parameters(self, generator: Optional[torch.Generator] = None) -> None:
        # A ~ kaiming-uniform(a=sqrt(5)) as nn.Linear and PEFT do; B = 0 so the untrained model equals the base.
        bound = 1.0 / math.sqrt(self.in_features)
        with torch.no_grad():
            a = torch.empty(self.lora_A.weight.shape, dtype=torch.float32)
            a.uniform_(-bound, bound, generator=generator)
            self.lora_A.weight.copy_(a)
            self.lora_B.weight.zero_()

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        if is_4bit(base):
            y = _Frozen4bitMatmul.apply(x, base)
        else:
            y = F.linear(x, base.weight.to(x.dtype))
        if getattr(base, "bias", None) is not None:
            y = y + base.bias.to(y.dtype)
        return y

    def lowp(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, s*B) in `dtype` for the fast path's matmuls; cached under `cache_optimizer_steps`."""
        A, B = self.lora_A.weight, self.lora_B.weight
        clock = self.__dict__.get("_lowp_clock")
        if clock is None:
            return A.detach().to(dtype), (B.detach() * self.scaling).to(dtype)
        key = _lowp_key(clock, (A, B), dtype)
        c = self.__dict__.get("_lowp")
        if c is None or c[0] != key:
            c = self.__dict__["_lowp"] = (key, A.detach().to(dtype), (B.detach() * self.scaling).to(dtype))
        return c[1], c[2]

    def _nf4_state(self):
        """The base weight's NF4State for the Triton kernel, built once (rebuilt if the weight moves)."""
        w = self.base_layer.weight
        key = (w.data_ptr(), w.device)
        if getattr(self, "_nf4_key", None) != key:
            from .kernels.nf4 import NF4State
            self._nf4, self._nf4_key = NF4State.from_quant_state(w.quant_state), key
        return self._nf4

    def keeps_weight(self) -> bool:
        """True when the fast path keeps the dequantized base weight for backward (checkpointing policy
        `keep`, set by `train.activations.apply_checkpointing`), in a training forward."""
        return self.__dict__.get("_fourbit_keep_w", False) and self.training and torch.is_grad_enabled()

    def fast_path(self, x: torch.Tensor) -> bool:
        """True when the GPU fast path (one autograd node over the NF4 weight) applies to x."""
        base = self.base_layer
        return x.is_cuda and is_4bit(base) and getattr(base, "bias", None) is None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # `_fourbit_no_forward` (set by train.activations' split recompute on o_proj / down_proj): the
        # output is only a handle for backward, so the frozen base GEMM is skipped (values undefined).
        no_fwd = self.__dict__.get("_fourbit_no_forward", False) and torch.is_grad_enabled()
        grp = self.__dict__.get("_fourbit_group")
        if grp is not None:                   # q/k/v on one input: the first call computes all three
            y = grp.member_forward(self, x)
            if y is not None:
                return y
        base = self.base_layer
        if self.fast_path(x):
            # GPU fast path: one autograd node (fourbit.kernels.lora_fn), same math as below.
            from .kernels.lora_fn import lora_nf4_linear
            xd = None if isinstance(self.lora_dropout, nn.Identity) or not self.training else self.lora_dropout(x)
            return lora_nf4_linear(x, xd, self.lora_A.weight, self.lora_B.weight, base.weight.data,
                                   self._nf4_state(), self.scaling, compute_y=not no_fwd, lowp=self.lowp(x.dtype),
                                   keep_w=self.keeps_weight())
        y = _FrozenBackwardOnly.apply(x, base) if no_fwd else self.base_forward(x)   # (..., out)
        drop = self.lora_dropout
        if isinstance(drop, FastDropout) and drop.training and not x.is_cuda:
            xd = drop.zero_dropped(x)                                        # CPU: mask only, one pass
            a = (self.lora_A.weight * drop.scale).to(x.dtype)                # (r, in), 1/(1-p) folded in
        else:
            xd, a = drop(x), self.lora_A.weight.to(x.dtype)
        b = (self.lora_B.weight * self.scaling).to(x.dtype)                  # (out, r), scaling folded in
        h = F.linear(xd, a)                                                  # (..., r)
        return y + F.linear(h, b)

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, 4bit={is_4bit(self.base_layer)}"


class LoRAGroup:
    """LoRALinears that read the same input (q/k/v, gate/up) run as one node on the GPU fast path:
    one dequantization buffer and one GEMM for the k base weights (`kernels.lora_fn.lora_nf4_group`).

    `fused(x)` returns the k outputs side by side (or None when the path does not apply: CPU, dropout
    in training, a bias, mixed dtypes). For q/k/v, whose calls transformers makes one by one,
    `member_forward` computes all k on the first member's call and hands the others their block when
    they are called with the same tensor; any other call falls back to the member's own path.
    Not a module: members keep their names, parameters and files.
    """

    def __init__(self, members: list):
        self.members = list(members)
        self.outs = [m.out_features for m in self.members]
        self._lowp = None                     # (key, lora_fn.group_lowp's tuple) under cache_optimizer_steps
        self._cache = None                    # (x, outputs) between the first and the last member's call

    def applies(self, x: torch.Tensor) -> bool:
        ms = self.members
        return (Switches.group and all(m.fast_path(x) and (isinstance(m.lora_dropout, nn.Identity) or not m.training) for m in ms)
                and len({m.scaling for m in ms}) == 1 and len({m.base_layer.weight.quant_state.dtype for m in ms}) == 1
                and len({m.in_features for m in ms}) == 1)

    def fused(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        if not self.applies(x):
            return None
        from .kernels.lora_fn import lora_nf4_group
        ms = self.members
        return lora_nf4_group(x, [m.lora_A.weight for m in ms], [m.lora_B.weight for m in ms],
                              [m.base_layer.weight.data for m in ms], [m._nf4_state() for m in ms], ms[0].scaling,
                              lowp=self.lowp(x.dtype), keep_w=ms[0].keeps_weight())

    def lowp(self, dtype: torch.dtype) -> tuple:
        """(stacked A's (k r, in), [s*B_i], block-diagonal s*B) in `dtype`, cached like `LoRALinear.lowp` (members share a clock)."""
        ms = self.members
        clock = ms[0].__dict__.get("_lowp_clock")
        if clock is not None:
            key = _lowp_key(clock, [t for m in ms for t in (m.lora_A.weight, m.lora_B.weight)], dtype)
            if self._lowp is not None and self._lowp[0] == key:
                return self._lowp[1]
        from .kernels.lora_fn import group_lowp
        val = group_lowp([m.lora_A.weight for m in ms], [m.lora_B.weight for m in ms], ms[0].scaling, dtype)
        if clock is not None:
            self._lowp = (key, val)
        return val

    def member_forward(self, m: "LoRALinear", x: torch.Tensor) -> Optional[torch.Tensor]:
        i = next(j for j, mm in enumerate(self.members) if mm is m)
        if i == 0:
            self._cache = None
            y = self.fused(x)
            if y is None:
                return None
            parts = y.split(self.outs, dim=-1)            # backward: one cat into the group's gradient
            self._cache = (x, parts)
            return parts[0]
        c = self._cache
        if c is None or c[0] is not x:
            return None
        if i == len(self.members) - 1:
            self._cache = None
        return c[1][i]


def group_lora(members: list) -> Optional[LoRAGroup]:
    """A LoRAGroup over `members` when all are LoRALinears (else None)."""
    return LoRAGroup(members) if members and all(isinstance(m, LoRALinear) for m in members) else None


class FlatLoRA:
    """Every LoRA weight of a model as a view of one fp32 buffer, `flat` (an nn.Parameter).

    An optimizer over `[flat]` updates all adapters in one launch (bitsandbytes' paged AdamW runs one
    kernel and one prefetch per tensor: 448 of them at Llama-3-8B) and `clip_grad_norm_` takes one
    norm. Adam and weight decay are elementwise, so the update equals the per-tensor one (not so for
    8-bit blockwise state: use it with 32-bit optimizers only). Per-layer gradients stay autograd's;
    `gather_grads()` concatenates them into `flat.grad` (one cat) before clipping and drops them,
    `zero_grad()` drops both (so no second gradient copy lives through the forward pass).
    """

    def __init__(self, model: nn.Module):
        layers = [m for _, m in lora_layers(model)]
        if not layers:
            raise ValueError("the model has no LoRA layers")
        ws = [lin.weight for m in layers for lin in (m.lora_A, m.lora_B)]
        flat = torch.empty(sum(w.numel() for w in ws), dtype=torch.float32, device=ws[0].device)
        o = 0
        for w in ws:
            flat[o:o + w.numel()].copy_(w.detach().reshape(-1))
            o += w.numel()
        self.flat = nn.Parameter(flat)
        base, o, self.params = self.flat.detach(), 0, []
        for m in layers:
            for lin in (m.lora_A, m.lora_B):
                n = lin.weight.numel()
                lin.weight = nn.Parameter(base[o:o + n].view(lin.weight.shape))   # shares flat's storage
                self.params.append(lin.weight)
                o += n

    def gather_grads(self) -> torch.Tensor:
        """flat.grad = the per-layer gradients back to back (zeros for a layer without one); the
        per-layer gradients are dropped (their memory freed here, while the GPU is still busy with
        the backward, not after the optimizer step, when the host's time is on the critical path)."""
        self.flat.grad = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                                    for p in self.params])
        for p in self.params:
            p.grad = None
        return self.flat.grad

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None
        self.flat.grad = None


def decoder_linear_names(model: nn.Module) -> list[str]:
    """Dotted names of the linear layers LoRA may target (everything but the output embedding)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [n for n, m in model.named_modules() if is_linear(m) and m is not head and not isinstance(m, LoRALinear)
            and not n.endswith(("lora_A", "lora_B"))]


def match_targets(model: nn.Module, targets) -> list[str]:
    """Module names selected by `targets` (`all-linear` or a list of names / dotted suffixes / regexes)."""
    names = decoder_linear_names(model)
    if targets == "all-linear":
        chosen = names
    else:
        if isinstance(targets, str):
            targets = [targets]
        chosen = []
        for n in names:
            for t in targets:
                if n == t or n.endswith("." + t) or re.fullmatch(t, n):
                    chosen.append(n)
                    break
    if not chosen:
        short = sorted({n.rsplit(".", 1)[-1] for n in names})
        raise FourbitError(f"lora.targets {targets!r} matches no linear layer of this model. Its linear layers are: "
                           f"{', '.join(short) or '(none)'}. Set lora.targets to some of these names or to all-linear.")
    return chosen


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def apply_lora(model: nn.Module, cfg: LoraConfig, seed: int = 0, targets: Optional[list[str]] = None,
               use_rslora: bool = False) -> list[str]:
    """Replace each targeted linear by a LoRALinear (in place). Returns the wrapped module names."""
    names = targets if targets is not None else match_targets(model, cfg.targets)
    gen = torch.Generator().manual_seed(seed)
    for name in names:
        base = model.get_submodule(name)
        layer = LoRALinear(base, cfg.r, cfg.alpha, cfg.dropout, use_rslora=use_rslora)
        layer.reset_parameters(gen)
        _set_module(model, name, layer)
    return names


def lora_layers(model: nn.Module) -> Iterable[tuple[str, LoRALinear]]:
    return ((n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear))


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for _, m in lora_layers(model) for p in (m.lora_A.weight, m.lora_B.weight)]


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) with 4-bit weights counted as their logical (unpacked) size."""
    total = 0
    for m in model.modules():
        for p in m.parameters(recurse=False):
            if hasattr(p, "quant_state") and p.dtype == torch.uint8:
                total += int(torch.Size(p.quant_state.shape).numel())
            else:
                total += p.numel()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


def _human(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}" if unit == "B" else f"{n / div:.1f}{unit}"
    return str(n)


def describe_parameters(model: nn.Module) -> str:
    """e.g. "trainable 41.9M / 8.07B (0.52%)"."""
    trainable, total = count_parameters(model)
    return f"trainable {_human(trainable)} / {_human(total)} ({100 * trainable / max(total, 1):.2f}%)"


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """LoRA weights under PEFT's file keys (base_model.model.<module>.lora_A.weight)."""
    out = {}
    for name, m in lora_layers(model):
        out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = m.lora_A.weight.detach().contiguous()
        out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = m.lora_B.weight.detach().contiguous()
    return out


def adapter_config(model: nn.Module, cfg: LoraConfig, base_name: str, quant: Optional[dict] = None) -> dict:
    """adapter_config.json content in PEFT's schema (fourbit's extras go to a sidecar file)."""
    names = [n for n, _ in lora_layers(model)]
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_name,
        "r": cfg.r, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout, "bias": "none",
        "target_modules": sorted({n.rsplit(".", 1)[-1] for n in names}),
        "fan_in_fan_out": False, "inference_mode": True, "use_rslora": False, "use_dora": False,
        "init_lora_weights": True, "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {},
    }


def fourbit_extras(model: nn.Module, quant: Optional[dict] = None) -> dict:
    """What fourbit needs beyond PEFT's schema: the quantization the adapter was trained against."""
    return {"version": 1, "modules": [n for n, _ in lora_layers(model)], "quant": quant}


def save_adapter(model: nn.Module, out_dir: str, cfg: LoraConfig, base_name: str, quant: Optional[dict] = None) -> None:
    """Write adapter_config.json + adapter_model.safetensors (PEFT layout) into `out_dir`."""
    from safetensors.torch import save_file
    os.makedirs(out_dir, exist_ok=True)
    save_file(adapter_state_dict(model), os.path.join(out_dir, ADAPTER_WEIGHTS), metadata={"format": "pt"})
    with open(os.path.join(out_dir, ADAPTER_CONFIG), "w", encoding="utf-8") as f:
        json.dump(adapter_config(model, cfg, base_name, quant), f, indent=2)
    with open(os.path.join(out_dir, FOURBIT_SIDECAR), "w", encoding="utf-8") as f:
        json.dump(fourbit_extras(model, quant), f, indent=2)


def read_adapter_config(adapter_dir: str, check_supported: bool = True) -> dict:
    path = os.path.join(adapter_dir, ADAPTER_CONFIG)
    if not os.path.isfile(path):
        raise FourbitError(f"`{adapter_dir}` is not an adapter folder: {ADAPTER_CONFIG} is missing. Give the "
                           "adapter/ folder of a run, or a PEFT LoRA adapter folder.")
    with open(path, encoding="utf-8") as f:
        try:
            acfg = json.load(f)
        except json.JSONDecodeError as e:
            raise FourbitError(f"{path} is not valid JSON: {e}") from None
    extras = os.path.join(adapter_dir, FOURBIT_SIDECAR)
    if os.path.isfile(extras) and "fourbit" not in acfg:
        with open(extras, encoding="utf-8") as f:
            try:
                acfg["fourbit"] = json.load(f)
            except json.JSONDecodeError as e:
                raise FourbitError(f"{extras} is not valid JSON: {e}") from None
    if not check_supported:
        return acfg
    if acfg.get("peft_type", "LORA") != "LORA":
        raise FourbitError(f"{path}: peft_type {acfg.get('peft_type')!r} is not supported; fourbit reads LoRA adapters.")
    for key, bad in (("use_dora", True), ("bias", "all"), ("bias", "lora_only")):
        if acfg.get(key) == bad:
            raise FourbitError(f"{path}: {key}={bad!r} is not supported by fourbit's LoRA layer.")
    if acfg.get("modules_to_save"):
        raise FourbitError(f"{path}: modules_to_save {acfg['modules_to_save']} (fully trained extra modules) "
                           "is not supported by fourbit.")
    return acfg


def load_adapter(model: nn.Module, adapter_dir: str) -> dict:
    """Attach a LoRA adapter (fourbit's or PEFT's) to `model` in place. Returns its config."""
    from safetensors.torch import load_file
    acfg = read_adapter_config(adapter_dir)
    wpath = os.path.join(adapter_dir, ADAPTER_WEIGHTS)
    if not os.path.isfile(wpath):
        legacy = os.path.join(adapter_dir, "adapter_model.bin")
        if os.path.isfile(legacy):
            from .safety import check_no_pickle_payload
            check_no_pickle_payload(legacy)           # a pickle that carries code is refused by name
            raise FourbitError(f"{legacy} is a pickled PyTorch file; fourbit loads adapter weights only from "
                               "safetensors. Convert it once where you trust it (peft: load, then save_pretrained "
                               "with safe_serialization=True).")
        raise FourbitError(f"Adapter weights {wpath} not found (fourbit reads only safetensors, never pickled .bin files).")
    try:
        sd = load_file(wpath)
    except Exception as e:  # safetensors raises its own error types for truncated / corrupt files
        raise FourbitError(f"Adapter weights {wpath} could not be read ({e}); the file is truncated or corrupt.") from None
    modules = sorted({k[len(PEFT_PREFIX):].rsplit(".lora_", 1)[0] for k in sd if ".lora_" in k})
    known = set(decoder_linear_names(model))
    missing = [m for m in modules if m not in known]
    if missing:
        raise FourbitError(f"Adapter {adapter_dir} targets modules this model does not have: {', '.join(missing[:5])}. "
                           "Is it an adapter for a different base model?")
    r, alpha = int(acfg["r"]), float(acfg["lora_alpha"])
    ranks, alphas = acfg.get("rank_pattern") or {}, acfg.get("alpha_pattern") or {}
    for name in modules:
        key = next((k for k in ranks if name == k or name.endswith("." + k)), None)
        mr = int(ranks[key]) if key else r
        key = next((k for k in alphas if name == k or name.endswith("." + k)), None)
        ma = float(alphas[key]) if key else alpha
        base = model.get_submodule(name)
        layer = LoRALinear(base, mr, ma, float(acfg.get("lora_dropout", 0.0)), use_rslora=bool(acfg.get("use_rslora")))
        for part in ("lora_A", "lora_B"):
            key = f"{PEFT_PREFIX}{name}.{part}.weight"
            if key not in sd:
                raise FourbitError(f"Adapter {wpath} lacks tensor {key}; the file is incomplete.")
            w = getattr(layer, part).weight
            if tuple(sd[key].shape) != tuple(w.shape):
                raise FourbitError(f"Adapter tensor {key} has shape {tuple(sd[key].shape)}, expected {tuple(w.shape)} "
                                   "for this base model.")
            with torch.no_grad():
                w.copy_(sd[key].to(w.dtype))
        _set_module(model, name, layer)
    return acfg

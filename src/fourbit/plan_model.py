"""What the memory plan needs to know about a model, read from its config alone (no weights).

The model is built on the `meta` device from its transformers config (a local folder's
config.json, a hub id, or a named shape `shape:NAME` of fourbit.shapes), so every linear layer,
embedding and norm is listed exactly as the real load would create it, for any architecture
transformers knows, while no byte of weight is allocated or downloaded.

Exact NF4 storage per quantized linear of n weights (bitsandbytes' `quantize_4bit` layout,
checked against real tensors in tests/test_plan.py), blocksize b:
    packed weight   ceil(n / 2) bytes (two 4-bit codes per uint8)
    absmax          ceil(n / b) blocks x 4 bytes (fp32); with double quant 1 byte (uint8) each, plus
    second level    ceil(blocks / 256) x 4 bytes (fp32 absmax of the absmax), 256 x 4 (its code), 4 (offset)
    NF4 code        16 x 4 bytes
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from typing import Optional

from .errors import FourbitError

ROLES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SPLIT_TYPES = ("llama", "mistral", "qwen2", "qwen3")     # train.activations.SPLIT_LAYERS, by config model_type


@dataclass
class Linear:
    name: str            # full module name, e.g. model.layers.3.self_attn.q_proj
    in_features: int
    out_features: int
    bias: bool

    @property
    def role(self) -> str:
        return self.name.rsplit(".", 1)[-1]

    @property
    def numel(self) -> int:
        return self.in_features * self.out_features


@dataclass
class ModelSpec:
    """Shapes of a causal LM, from its config."""
    source: str
    model_type: str
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool
    linears: list[Linear] = field(default_factory=list)     # decoder linears (quantized), not the LM head
    embed_params: int = 0
    head_params: int = 0                                     # 0 when tied to the input embedding
    other_params: int = 0                                    # norms, biases of other modules, ...
    buffers_bytes: int = 0                                   # rotary inv_freq and the like (fp32)

    @property
    def llama_like(self) -> bool:
        """True when each layer has exactly the seven Llama projections (the activation formula is exact)."""
        roles = {l.role for l in self.linears}
        return roles == set(ROLES)

    @property
    def splittable(self) -> bool:
        """True when `train.activations` splits its layers (selective / offload) and fuses them on CUDA:
        Llama, Mistral, Qwen2 and Qwen3 decoder layers (its SPLIT_LAYERS), read here off the model type."""
        return self.llama_like and self.model_type in SPLIT_TYPES


def nf4_bytes(numel: int, blocksize: int = 64, double_quant: bool = True) -> tuple[int, int]:
    """(packed weight bytes, scale bytes) of one NF4 tensor of `numel` weights, as bitsandbytes stores it."""
    blocks = math.ceil(numel / blocksize)
    packed = math.ceil(numel / 2)
    code = 16 * 4
    if double_quant:
        scales = blocks + math.ceil(blocks / 256) * 4 + 256 * 4 + 4 + code
    else:
        scales = blocks * 4 + code
    return packed, scales


def parse_model(model: str) -> tuple[str, Optional[str]]:
    """`shape:NAME` -> ("shape", NAME); anything else -> ("path_or_hub", model)."""
    if model.startswith("shape:"):
        return "shape", model.split(":", 1)[1]
    return "path_or_hub", model


def load_model_config(model: str, trust_remote_code: bool = False):
    """The transformers config of a folder, hub id or `shape:NAME` (never weights)."""
    kind, name = parse_model(model)
    if kind == "shape":
        from .shapes import SHAPES, shape_config
        if name not in SHAPES:
            raise FourbitError(f"Unknown model shape `{name}` in `model: {model}`. Known shapes: "
                               f"{', '.join('shape:' + s for s in SHAPES)}.")
        return shape_config(name)
    from transformers import AutoConfig
    if os.path.isdir(model) and not os.path.isfile(os.path.join(model, "config.json")):
        raise FourbitError(f"Model folder `{model}` has no config.json; the memory plan needs it.")
    try:
        return AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise FourbitError(f"Could not read the config of `{model}` to plan memory: {e}. Without internet access "
                           "only local folders and `shape:NAME` models work; `--force` skips the plan.") from None


def model_spec(model: str, trust_remote_code: bool = False, mcfg=None) -> ModelSpec:
    """Build the model on the meta device and list what the real load would allocate."""
    import torch
    import torch.nn as nn
    from transformers import AutoModelForCausalLM
    mcfg = mcfg if mcfg is not None else load_model_config(model, trust_remote_code)
    if getattr(mcfg, "quantization_config", None):
        raise FourbitError(f"Model `{model}` is already quantized; point `model` at the 16-bit original.")
    text = mcfg.get_text_config() if hasattr(mcfg, "get_text_config") else mcfg
    try:
        with torch.device("meta"):
            m = AutoModelForCausalLM.from_config(mcfg, trust_remote_code=trust_remote_code)
    except ValueError as e:
        raise FourbitError(f"transformers cannot build a causal LM from the config of `{model}`: {e}") from None
    head = m.get_output_embeddings()
    emb = m.get_input_embeddings()
    linears, in_linear = [], set()
    for name, mod in m.named_modules():
        if isinstance(mod, nn.Linear) and mod is not head:
            linears.append(Linear(name, mod.in_features, mod.out_features, mod.bias is not None))
            in_linear.add(id(mod.weight))
    tied = head is not None and head.weight is emb.weight
    seen, other = set(), 0
    for p in m.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if id(p) in in_linear or p is emb.weight or (head is not None and p is head.weight):
            continue
        other += p.numel()                      # norms, biases (incl. those of quantized linears)
    buf = sum(b.numel() * b.element_size() for b in m.buffers())
    H = text.hidden_size
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or H // heads
    return ModelSpec(
        source=model, model_type=getattr(text, "model_type", "?"), vocab=text.vocab_size, hidden=H,
        intermediate=getattr(text, "intermediate_size", 4 * H), layers=text.num_hidden_layers, heads=heads,
        kv_heads=getattr(text, "num_key_value_heads", None) or heads, head_dim=head_dim, tied=tied,
        linears=linears, embed_params=emb.weight.numel(),
        head_params=0 if tied or head is None else head.weight.numel(), other_params=other, buffers_bytes=buf)


def lora_targets(spec: ModelSpec, targets) -> list[Linear]:
    """The linears `lora.targets` selects (the rules of fourbit.lora.match_targets)."""
    if targets == "all-linear":
        return list(spec.linears)
    if isinstance(targets, str):
        targets = [targets]
    chosen = [l for l in spec.linears
              if any(l.name == t or l.name.endswith("." + t) or re.fullmatch(t, l.name) for t in targets)]
    if not chosen:
        roles = sorted({l.role for l in spec.linears})
        raise FourbitError(f"lora.targets {targets!r} matches no linear layer of `{spec.source}`. Its linear layers "
                           f"are: {', '.join(roles)}.")
    return chosen

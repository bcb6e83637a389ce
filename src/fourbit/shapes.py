"""Named model shapes and randomly initialised models of them, built without the hub.

Used by `fourbit bench` (benchmarks/train_throughput.py) and by memory planning: a Llama-3-70B
shape cannot exist in 16 bits on one GPU, so the model is built on the `meta` device and each
decoder layer is materialised, drawn and quantized to NF4 one linear at a time on the target
device. At most one 16-bit weight matrix (plus its fp32 draw) is alive at any moment.

Quantization goes through bitsandbytes exactly as transformers' bnb-4bit loader does it:
a `bnb.nn.Linear4bit` module whose weight becomes `Params4bit(bf16_weight, **meta_weight.__dict__)
.to(device)`, i.e. `bitsandbytes.functional.quantize_4bit(w, blocksize=64, compress_statistics=True,
quant_type="nf4", quant_storage=uint8)`: the bits equal what `from_pretrained(...,
quantization_config=BitsAndBytesConfig(nf4, double quant))` would load for the same bf16 weights.

Weights: N(0, 0.02) like transformers' init (norms 1), each tensor drawn in fp32 from its own
generator seeded by (seed, tensor index), then rounded to bf16, so a model is reproducible
whatever the build order or device.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

# LlamaConfig keyword arguments per named shape.
SHAPES: dict[str, dict] = {
    "tiny": dict(vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096),
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                         rope_theta=100000.0, tie_word_embeddings=True),
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                      rope_theta=500000.0),
    "llama3-70b": dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                       num_attention_heads=64, num_key_value_heads=8, max_position_embeddings=8192,
                       rope_theta=500000.0),
}

PROJ = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
STD = 0.02


def shape_config(shape: str, **overrides):
    """The transformers LlamaConfig of a named shape."""
    from transformers import LlamaConfig
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    kw = dict(SHAPES[shape], **overrides)
    kw.setdefault("tie_word_embeddings", False)
    return LlamaConfig(**kw)


def flops_per_token(cfg, seq: int, r: int, recompute: bool, split: bool = False) -> float:
    """FLOPs per trained token as in ANCHORS.md (frozen base, LoRA on the seven projections).

    N_w = linear params of the decoder + LM head, A = causal attention forward FLOPs per token
    (2 * seq * d_attn per layer: QK^T and PV over seq/2 keys on average), N_L = LoRA params:
    no recompute: 4 N_w + 3.5 A + 6 N_L;  full per-layer recompute: 6 N_w - 2 N_head + 4.5 A + 8 N_L;
    split recompute (selective/offload, `train.activations`): also - 2 N_out, the o_proj and down_proj
    weights whose forward is not run again.
    """
    H, I, L, V = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
    hd = getattr(cfg, "head_dim", None) or H // cfg.num_attention_heads
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    per_layer = H * q + 2 * H * kv + q * H + 3 * H * I
    n_head = V * H
    n_w = L * per_layer + n_head
    a = L * 2 * seq * q
    n_l = L * r * ((H + q) + 2 * (H + kv) + (q + H) + 2 * (H + I) + (I + H))
    if recompute:
        n_out = L * (q * H + I * H)
        return 6 * n_w - 2 * n_head - (2 * n_out if split else 0) + 4.5 * a + 8 * n_l
    return 4 * n_w + 3.5 * a + 6 * n_l


def _draw(shape: tuple, device, seed: int, index: int) -> torch.Tensor:
    """(shape) bf16 ~ N(0, STD), from a generator seeded by (seed, index) on `device`."""
    g = torch.Generator(device=device).manual_seed(seed * 1_000_003 + index)
    w = torch.empty(shape, dtype=torch.float32, device=device).normal_(0.0, STD, generator=g)
    return w.to(torch.bfloat16)


def _linear(w: torch.Tensor, quant: str, device) -> nn.Module:
    """A frozen bf16 linear, or an NF4 + double-quant `Linear4bit` made the way transformers makes it."""
    out_f, in_f = w.shape
    if quant == "none":
        lin = nn.Linear(in_f, out_f, bias=False, device="meta", dtype=torch.bfloat16)
        lin.weight = nn.Parameter(w, requires_grad=False)
        return lin
    import bitsandbytes as bnb
    lin = bnb.nn.Linear4bit(in_f, out_f, bias=False, compute_dtype=torch.bfloat16, compress_statistics=True,
                            quant_type="nf4", quant_storage=torch.uint8, device="meta")
    old = lin.weight
    lin.weight = bnb.nn.Params4bit(w, requires_grad=False, **old.__dict__).to(device)
    return lin


def build_random_model(shape: str, device="cuda", quant: str = "nf4", seed: int = 0,
                       attn_implementation: str = "sdpa", config_overrides: Optional[dict] = None):
    """A LlamaForCausalLM of a named shape with random weights, frozen, on `device`.

    Args:
        shape: a key of SHAPES.
        quant: "nf4" (bitsandbytes NF4 + double quant, blocksize 64, bf16 compute) or "none" (bf16).
        seed: weights are a pure function of (shape, seed).
    Returns:
        The model in train mode with every parameter frozen (requires_grad False), use_cache off.
    """
    from transformers import LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    if quant not in ("nf4", "none"):
        raise ValueError(f"quant must be 'nf4' or 'none', got {quant!r}")
    device = torch.device(device)
    cfg = shape_config(shape, **(config_overrides or {}))
    cfg._attn_implementation = attn_implementation
    cfg.use_cache = False
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    idx = 0
    inner = model.model
    inner.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, device="meta", dtype=torch.bfloat16)
    inner.embed_tokens.weight = nn.Parameter(_draw((cfg.vocab_size, cfg.hidden_size), device, seed, idx),
                                             requires_grad=False)
    for layer in inner.layers:
        for name in PROJ:
            idx += 1
            old = layer.get_submodule(name)
            parent, _, child = name.rpartition(".")
            w = _draw((old.out_features, old.in_features), device, seed, idx)
            setattr(layer.get_submodule(parent), child, _linear(w, quant, device))
            del w
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            norm.weight = nn.Parameter(torch.ones(cfg.hidden_size, dtype=torch.bfloat16, device=device),
                                       requires_grad=False)
    inner.norm.weight = nn.Parameter(torch.ones(cfg.hidden_size, dtype=torch.bfloat16, device=device),
                                     requires_grad=False)
    with torch.device(device):
        inner.rotary_emb = LlamaRotaryEmbedding(cfg)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = inner.embed_tokens.weight
    else:
        idx += 1
        model.lm_head.weight = nn.Parameter(_draw((cfg.vocab_size, cfg.hidden_size), device, seed, idx),
                                            requires_grad=False)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.device.type == "meta"]
    if left:
        raise RuntimeError(f"build_random_model left tensors on the meta device: {left[:5]}")
    model.train()
    return model

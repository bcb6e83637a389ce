"""Llama-family layout for GGUF: hyperparameter keys, tensor names, and the rotary permutation.

Written for fourbit instead of running llama.cpp's `convert_hf_to_gguf.py`: that script is not
an installable package, covers hundreds of architectures we do not need, and loads every tensor
up front; fourbit streams a merged folder into the file with the `gguf` package's writer and
needs only this small table. The names are llama.cpp's (gguf-py's `MODEL_TENSOR` names).
"""
from __future__ import annotations

import re
from typing import Optional

import numpy as np

from ..errors import FourbitError

#: transformers model_type -> llama.cpp architecture. Mistral and SmolLM are `llama` in llama.cpp.
ARCHES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}

_LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_TOP = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight"}


def gguf_arch(config: dict) -> str:
    """The llama.cpp architecture for a transformers config, or a FourbitError naming what is supported."""
    model_type = config.get("model_type")
    if model_type not in ARCHES:
        raise FourbitError(f"fourbit exports GGUF for {', '.join(sorted(ARCHES))} models (Llama, Mistral, Qwen2, "
                           f"SmolLM); this model's model_type is `{model_type}`. Use llama.cpp's "
                           "convert_hf_to_gguf.py on the merged folder for other architectures.")
    rope = config.get("rope_scaling") or config.get("rope_parameters") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    if rope_type not in (None, "default"):
        raise FourbitError(f"This model uses `{rope_type}` rope scaling, which fourbit's GGUF export does not "
                           "write yet. Use llama.cpp's convert_hf_to_gguf.py on the merged folder.")
    return ARCHES[model_type]


def gguf_name(hf_name: str) -> Optional[str]:
    """`model.layers.3.self_attn.q_proj.weight` -> `blk.3.attn_q.weight`; None for tensors GGUF leaves out."""
    if hf_name in _TOP:
        return _TOP[hf_name]
    if hf_name.endswith("rotary_emb.inv_freq"):
        return None
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+?)(\.weight|\.bias)?", hf_name)
    if m:
        key, suffix = m.group(2), m.group(3) or ""
        if key + suffix in _LAYER:
            return f"blk.{m.group(1)}.{_LAYER[key + suffix]}"
        if key in _LAYER:
            return f"blk.{m.group(1)}.{_LAYER[key]}{suffix}"
    raise FourbitError(f"Tensor `{hf_name}` has no place in a llama-family GGUF file; this checkpoint is not a "
                       "plain Llama/Mistral/Qwen2 model. Use llama.cpp's convert_hf_to_gguf.py.")


def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder q/k output rows from transformers' rotate-half layout to llama.cpp's interleaved pairs.

    Per head, transformers rotates (x[i], x[i + d/2]); llama.cpp's `llama` arch rotates (x[2i], x[2i+1]).
    Row i of the first half and row i of the second half of each head become rows 2i and 2i+1.
    Works for a weight (out, in), a bias (out,) and a LoRA B (out, r).
    """
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def needs_permute(arch: str, gguf_tensor: str) -> bool:
    return arch == "llama" and (".attn_q." in gguf_tensor or ".attn_k." in gguf_tensor)


def heads_for(config: dict, gguf_tensor: str) -> int:
    return config["num_key_value_heads"] if ".attn_k." in gguf_tensor else config["num_attention_heads"]


def add_hparams(writer, arch: str, config: dict, name: str) -> None:
    """The `{arch}.*` keys llama.cpp (and transformers' GGUF reader) build the model from."""
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    rope = config.get("rope_parameters") if isinstance(config.get("rope_parameters"), dict) else {}
    writer.add_name(name)
    writer.add_context_length(int(config.get("max_position_embeddings", 4096)))
    writer.add_embedding_length(int(config["hidden_size"]))
    writer.add_block_count(int(config["num_hidden_layers"]))
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(int(heads))
    writer.add_head_count_kv(int(config.get("num_key_value_heads") or heads))
    writer.add_rope_freq_base(float(config.get("rope_theta", rope.get("rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    writer.add_rope_dimension_count(int(head_dim))
    writer.add_key_length(int(head_dim))
    writer.add_value_length(int(head_dim))
    writer.add_vocab_size(int(config["vocab_size"]))

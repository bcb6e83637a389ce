"""Reading what a merge or export starts from: a run folder or a PEFT-layout adapter, and its base model.

We read `adapter_config.json` + `adapter_model.safetensors` ourselves instead of importing peft:
peft is a test dependency only, and the merge needs nothing but the A/B matrices and the scale,
which lets it stream the base model shard by shard (peft's `merge_and_unload` needs the whole
model in memory). The NF4 round trip uses bitsandbytes' own quantize/dequantize, so the weights
match bit for bit what transformers + bitsandbytes build at load time.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from ..errors import FourbitError

PEFT_PREFIX = "base_model.model."
#: QLoRA's defaults, assumed for a plain PEFT adapter whose config has no `fourbit.quant` entry.
DEFAULT_QUANT = {"bits": 4, "type": "nf4", "double_quant": True, "blocksize": 64, "compute_dtype": "bfloat16"}
_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model", "special_tokens_map.json",
                    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json")


@dataclass
class LoraLayer:
    """One adapted linear: W (out, in) += scale * B (out, r) @ A (r, in)."""
    A: torch.Tensor  # (r, in)
    B: torch.Tensor  # (out, r)
    scale: float

    def delta(self) -> torch.Tensor:
        """scale * B @ A in float32, shape (out, in)."""
        return self.scale * (self.B.float() @ self.A.float())


@dataclass
class Adapter:
    """A LoRA adapter resolved against its base model.

    `layers` maps a base-model weight name (`model.layers.0.self_attn.q_proj.weight`) to its LoRA
    pair; `replaced` holds whole tensors the adapter saves (PEFT's modules_to_save).
    """
    dir: str
    config: dict
    layers: dict[str, LoraLayer]
    replaced: dict[str, torch.Tensor]
    quant: Optional[dict]
    base_dir: str
    run_dir: Optional[str] = None
    run_config: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def is_model_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json"))


def find_adapter(source: str) -> tuple[str, Optional[str], dict]:
    """`(adapter_dir, run_dir or None, run config dict)` for a run folder or an adapter folder."""
    if not os.path.exists(source):
        raise FourbitError(f"`{source}` does not exist. Pass a run folder (with adapter/ and config.yaml) "
                           "or an adapter folder (with adapter_config.json).")
    if os.path.isfile(os.path.join(source, "adapter_config.json")):
        adapter_dir = source
        parent = os.path.dirname(os.path.abspath(source))
        run_dir = parent if os.path.isfile(os.path.join(parent, "config.yaml")) else None
    elif os.path.isfile(os.path.join(source, "adapter", "adapter_config.json")):
        adapter_dir, run_dir = os.path.join(source, "adapter"), source
    elif is_model_dir(source):
        raise FourbitError(f"`{source}` is a model folder (it has config.json), not a LoRA adapter. "
                           "Pass a run folder or an adapter folder with adapter_config.json; "
                           "a merged model can be exported directly with `fourbit export gguf`.")
    else:
        raise FourbitError(f"`{source}` is neither a run folder (adapter/ + config.yaml) nor an adapter folder "
                           "(adapter_config.json + adapter_model.safetensors). Check the path; a run that has not "
                           "finished has its adapters under checkpoints/step-N/.")
    run_config: dict = {}
    if run_dir is not None and os.path.isfile(os.path.join(run_dir, "config.yaml")):
        import yaml
        with open(os.path.join(run_dir, "config.yaml"), encoding="utf-8") as f:
            run_config = yaml.safe_load(f) or {}
    return adapter_dir, run_dir, run_config


def resolve_model_dir(name: str, what: str) -> str:
    """A local folder for `name` (a folder, or a hub id already in the local cache / downloadable)."""
    if os.path.isdir(name):
        if not is_model_dir(name):
            raise FourbitError(f"{what} `{name}` has no config.json. Pass a transformers model folder with --model.")
        return name
    try:
        from huggingface_hub import snapshot_download
        path = snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.model", "*.jinja", "*.txt"])
    except Exception as e:  # offline, unknown repo, bad id: all fixable by the user the same way
        raise FourbitError(f"{what} `{name}` is not a local folder and could not be fetched from the hub "
                           f"({type(e).__name__}). Pass the base model folder with --model.") from None
    return path


def weight_shards(model_dir: str) -> list[str]:
    """The safetensors files of a model folder, in index order."""
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            files = list(dict.fromkeys(json.load(f)["weight_map"].values()))
        return [os.path.join(model_dir, name) for name in files]
    single = os.path.join(model_dir, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    raise FourbitError(f"Model folder `{model_dir}` has no safetensors weights (model.safetensors or "
                       "model.safetensors.index.json). Re-save it with save_pretrained(safe_serialization=True).")


def tokenizer_source(adapter: Adapter) -> str:
    """The adapter folder when the trainer saved the tokenizer there (its chat template wins), else the base."""
    if os.path.isfile(os.path.join(adapter.dir, "tokenizer_config.json")):
        return adapter.dir
    return adapter.base_dir


def tokenizer_files(folder: str) -> list[str]:
    return [n for n in _TOKENIZER_FILES if os.path.isfile(os.path.join(folder, n))]


def _pattern_value(patterns: dict, module: str, default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches the module name or one of its suffixes."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def load_adapter(source: str, model: Optional[str] = None) -> Adapter:
    """Read a run or adapter folder and resolve its base model (--model, run config, adapter_config)."""
    from safetensors.torch import load_file

    from ..lora import read_adapter_config
    adapter_dir, run_dir, run_config = find_adapter(source)
    cfg = read_adapter_config(adapter_dir, check_supported=False)  # + fourbit's sidecar (quant settings)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise FourbitError(f"`{adapter_dir}` is a {cfg.get('peft_type')} adapter; fourbit merges LoRA adapters only.")
    if cfg.get("use_dora"):
        raise FourbitError(f"`{adapter_dir}` is a DoRA adapter (use_dora: true), which fourbit cannot merge yet. "
                           "Merge it with peft's merge_and_unload instead.")
    weights = os.path.join(adapter_dir, "adapter_model.safetensors")
    if not os.path.isfile(weights):
        raise FourbitError(f"`{adapter_dir}` has adapter_config.json but no adapter_model.safetensors. "
                           "Re-save the adapter with safetensors (PEFT: save_pretrained(safe_serialization=True)).")
    base_name = model or run_config.get("model") or cfg.get("base_model_name_or_path")
    if not base_name:
        raise FourbitError(f"The adapter `{adapter_dir}` does not name its base model. Pass it with --model.")
    source_of = "--model" if model else ("the run config" if run_config.get("model") else "adapter_config.json")
    base_dir = resolve_model_dir(base_name, f"Base model (from {source_of})")

    tensors = load_file(weights)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    replaced: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        m = re.match(r"(.+)\.lora_([AB])(?:\.[^.]+)?\.weight$", name)
        if m:
            pairs.setdefault(m.group(1), {})[m.group(2)] = t
        elif ".lora_embedding_" in name or ".lora_magnitude" in name:
            raise FourbitError(f"Adapter tensor `{key}` (LoRA on an embedding, or DoRA) is not supported by fourbit's "
                               "merge. Train with targets on linear layers only.")
        else:
            replaced[name.replace(".modules_to_save.default", "")] = t
    rslora = bool(cfg.get("use_rslora"))
    layers = {}
    for module, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise FourbitError(f"Adapter `{adapter_dir}` has lora_A without lora_B (or the reverse) for `{module}`; "
                               "the adapter file is incomplete. Re-save it.")
        r = ab["A"].shape[0]
        alpha = float(_pattern_value(cfg.get("alpha_pattern"), module, cfg.get("lora_alpha", r)))
        scale = alpha / math.sqrt(r) if rslora else alpha / r
        layers[module + ".weight"] = LoraLayer(A=ab["A"], B=ab["B"], scale=scale)
    if not layers:
        raise FourbitError(f"Adapter `{adapter_dir}` holds no lora_A/lora_B weights; nothing to merge.")
    quant = (cfg.get("fourbit") or {}).get("quant")
    notes = []
    if quant is None and isinstance(run_config.get("quant"), dict):
        quant = run_config["quant"]
    if quant is None:
        quant = dict(DEFAULT_QUANT)
        notes.append("adapter_config.json has no fourbit.quant entry; assuming QLoRA's NF4 settings "
                     "(nf4, double quant, blocksize 64) for the dequantized base")
    return Adapter(dir=adapter_dir, config=cfg, layers=layers, replaced=replaced, quant=quant, base_dir=base_dir,
                   run_dir=run_dir, run_config=run_config, notes=notes)


def nf4_roundtrip(w: torch.Tensor, quant: dict) -> torch.Tensor:
    """The weight the 4-bit model computes with: bitsandbytes quantize_4bit -> dequantize_4bit.

    `w` is quantized as stored on disk (transformers hands bitsandbytes the checkpoint tensor; the
    4-bit codes come out the same whether it is bf16 or its exact fp32 copy), then dequantized to
    the compute dtype, as bitsandbytes does before each matmul.
    """
    import bitsandbytes.functional as bnbf

    compute = getattr(torch, str(quant.get("compute_dtype", "bfloat16")))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    q, state = bnbf.quantize_4bit(w.to(device), blocksize=int(quant.get("blocksize", 64)),
                                  compress_statistics=bool(quant.get("double_quant", True)),
                                  quant_type=str(quant.get("type", "nf4")))
    return bnbf.dequantize_4bit(q, state).to("cpu", compute)

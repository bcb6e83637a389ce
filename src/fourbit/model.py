"""Load the frozen base model: NF4 + double quant through transformers + bitsandbytes, or plain 16-bit.

Rules kept here: the base is frozen; embeddings, norms and the LM head stay in the compute dtype
(never upcast to fp32: that costs memory and speed for no accuracy a LoRA run needs);
`trust_remote_code` only when the user opts in.
"""
from __future__ import annotations

import json
import os
from typing import Optional

import torch

from .config import Config, QuantConfig
from .errors import FourbitError

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def resolve_device(setting: str = "auto") -> torch.device:
    """`auto` -> cuda when available, else cpu. Under torchrun, the local rank's GPU."""
    if setting == "auto":
        setting = "cuda" if torch.cuda.is_available() else "cpu"
    if setting == "cuda":
        if not torch.cuda.is_available():
            raise FourbitError("train.device is `cuda` but no CUDA GPU is visible. Set --train.device=cpu "
                               "(small models only) or run on a machine with a GPU.")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device(setting)


def quiet_bitsandbytes() -> None:
    """bitsandbytes warns at import that an optional CPU matmul kernel (from the `kernels` hub package) is
    missing; fourbit never calls that kernel (it dequantizes and uses torch's matmul), so the warning
    only misleads users."""
    import logging
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def _cpu_has_fast_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return True                                   # unknown: say nothing rather than guess


def _check_model_source(name: str, need: str = "config.json") -> None:
    if os.path.isdir(name):
        if not os.path.isfile(os.path.join(name, need)):
            raise FourbitError(f"Model folder `{name}` has no {need}. Point `model` at a transformers model "
                               "folder (config.json, tokenizer and *.safetensors) or a hub id.")
        return
    looks_like_path = name.startswith((".", "/", "~")) or os.sep in name.strip("/").split("/", 1)[-1] \
        or name.count("/") > 1
    if looks_like_path:
        raise FourbitError(f"Model folder `{name}` not found. Check the path, or give a hub id such as "
                           "HuggingFaceTB/SmolLM2-135M-Instruct.")


def load_tokenizer(name: str, trust_remote_code: bool = False):
    """The model's tokenizer; pad falls back to eos (padding is masked by position, so this is safe)."""
    from transformers import AutoTokenizer
    _check_model_source(name, "tokenizer_config.json")
    try:
        tok = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise FourbitError(f"Could not load a tokenizer for `{name}`: {e}. Check the hub id or folder; "
                           "without internet access only local folders work.") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def bnb_config(quant: QuantConfig):
    from transformers import BitsAndBytesConfig
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant.type,
                              bnb_4bit_use_double_quant=quant.double_quant,
                              bnb_4bit_compute_dtype=DTYPES[quant.compute_dtype],
                              bnb_4bit_quant_storage=torch.uint8)


def load_base(name: str, quant: Optional[QuantConfig], device: torch.device, trust_remote_code: bool = False,
              attn_implementation: str = "auto"):
    """The frozen base model on `device`, quantized to 4-bit when `quant.bits == 4`.

    Returns the transformers model in eval-free state (dropout of the base is whatever the config says;
    Llama-family models have none) with every parameter frozen.
    """
    from transformers import AutoConfig, AutoModelForCausalLM
    _check_model_source(name)
    quiet_bitsandbytes()
    quant = quant or QuantConfig(bits=None)
    dtype = DTYPES[quant.compute_dtype]
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise FourbitError("This GPU has no bfloat16 support. Set --quant.compute_dtype=float16.")
    if device.type == "cpu" and dtype == torch.bfloat16 and not _cpu_has_fast_bf16():
        import sys
        print("note: this CPU has no native bfloat16 matmul (AVX512-BF16/AMX); --quant.compute_dtype=float32 "
              "is likely faster here.", file=sys.stderr)
    try:
        mcfg = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise FourbitError(f"Could not read the model config of `{name}`: {e}") from None
    except ValueError as e:
        if "trust_remote_code" in str(e):
            raise FourbitError(f"Model `{name}` needs its own Python code. If you trust it, set "
                               "trust_remote_code: true in the config.") from None
        raise
    if hasattr(mcfg, "quantization_config"):
        raise FourbitError(f"Model `{name}` is already quantized ({mcfg.quantization_config.get('quant_method', '?') if isinstance(mcfg.quantization_config, dict) else 'quantized'}). "
                           "Point `model` at the 16-bit original; fourbit quantizes it to NF4 on load.")
    kwargs = dict(dtype=dtype, trust_remote_code=trust_remote_code, device_map={"": device})
    attn = "sdpa" if attn_implementation == "auto" else attn_implementation
    kwargs["attn_implementation"] = attn
    if quant.bits == 4:
        kwargs["quantization_config"] = bnb_config(quant)
    model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
    model.config.use_cache = False
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def model_config_dict(name: str) -> dict:
    """config.json of a local folder (for fingerprints and plans)."""
    path = os.path.join(name, "config.json")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    from transformers import AutoConfig
    return AutoConfig.from_pretrained(name).to_dict()


def load_for_training(cfg: Config, device: torch.device):
    """Tokenizer + frozen base for a run config."""
    tok = load_tokenizer(cfg.model, cfg.trust_remote_code)
    model = load_base(cfg.model, cfg.quant, device, cfg.trust_remote_code, cfg.attn_implementation)
    return model, tok

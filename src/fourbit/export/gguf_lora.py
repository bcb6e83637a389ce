"""`fourbit export gguf --adapter-only`: the LoRA adapter as a GGUF file for llama.cpp's `--lora`.

llama.cpp applies `W x + s * B (A x)` with `s = adapter.lora.alpha / r` (r = rows of A). Tensors are
named after the base weight they update plus `.lora_a` (r, in) and `.lora_b` (out, r); for the
`llama` arch B's rows get the same rotary permutation as the q/k weights. Written here, rather than
with llama.cpp's `convert_lora_to_gguf.py`, because that script needs peft, the base model's
config from the hub and llama.cpp's source tree; we already hold the A/B pairs (adapter.py).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Optional

import gguf
import numpy as np

from ..errors import FourbitError
from .adapter import load_adapter
from .gguf import TYPES, encode, tensor_type
from .gguf_arch import gguf_arch, gguf_name, heads_for, needs_permute, permute_rows


@dataclass
class LoraGGUFResult:
    path: str
    arch: str
    pairs: int
    alpha: float
    bytes: int


def export_gguf_lora(source: str, out_file: str, out_type: str = "f16",
                     model: Optional[str] = None) -> LoraGGUFResult:
    """Write the LoRA of a run or adapter folder as a llama.cpp adapter GGUF.

    Args:
        source: run folder or adapter folder (the base model is resolved as for `fourbit merge`).
        out_file: .gguf file to write.
        out_type: "f16", "bf16" or "q8_0" for the A/B matrices (q8_0 only where rows fit 32-blocks).
    """
    if out_type not in TYPES:
        raise FourbitError(f"--type must be one of {', '.join(TYPES)}, got `{out_type}`.")
    adapter = load_adapter(source, model)
    with open(os.path.join(adapter.base_dir, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    arch = gguf_arch(config)
    if adapter.replaced:
        raise FourbitError(f"The adapter saves whole tensors ({', '.join(sorted(adapter.replaced))}), which a "
                           "llama.cpp LoRA file cannot hold. Export the merged model instead (without --adapter-only).")
    # llama.cpp has one alpha per file; per-module scales (rank/alpha patterns) are folded into B instead.
    effective = {round(layer.scale * layer.A.shape[0], 6) for layer in adapter.layers.values()}
    fold = len(effective) != 1
    alpha = 0.0 if fold else float(effective.pop())

    tmp = out_file + f".tmp{os.getpid()}"
    os.makedirs(os.path.dirname(os.path.abspath(out_file)), exist_ok=True)
    w = gguf.GGUFWriter(tmp, arch)
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_name(os.path.basename(os.path.normpath(adapter.run_dir or adapter.dir)))
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    total = 0
    for key, layer in adapter.layers.items():
        g = gguf_name(key)
        if g is None or not g.endswith(".weight"):
            raise FourbitError(f"The adapter updates `{key}`, which has no llama.cpp tensor to attach a LoRA to.")
        a = layer.A.float().numpy()                                       # (r, in)
        b = layer.B.float().numpy() * (layer.scale if fold else 1.0)      # (out, r)
        if needs_permute(arch, g):
            b = permute_rows(b, heads_for(config, g))
        for suffix, m in ((".lora_a", a), (".lora_b", b)):
            qtype = tensor_type(m.shape, out_type)
            data = encode(np.ascontiguousarray(m), qtype)
            plain = qtype in (gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.F32)
            w.add_tensor(g + suffix, data, raw_dtype=None if plain else qtype)
            total += data.nbytes
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, out_file)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return LoraGGUFResult(path=out_file, arch=arch, pairs=len(adapter.layers), alpha=alpha,
                          bytes=os.path.getsize(out_file))

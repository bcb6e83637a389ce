"""`fourbit export gguf`: a merged llama-family model (or a run, merged first) as one GGUF file.

We write the file with the `gguf` package's `GGUFWriter` ourselves rather than shelling out to
llama.cpp's `convert_hf_to_gguf.py`, which is not an installable package and loads the whole
model first. Here the tensor table is declared up front from the safetensors headers, then each
tensor is read, converted (f16 / bf16 / q8_0 via `gguf.quants`) and streamed to disk, so memory
stays near one tensor. Norms and biases stay F32, as llama.cpp expects. For the `llama` arch,
q/k rows are permuted to llama.cpp's rotary layout (see gguf_arch.permute_rows).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import tempfile
from dataclasses import dataclass
from typing import Callable, Optional

import gguf
import numpy as np
import torch

from ..errors import FourbitError
from .adapter import find_adapter, is_model_dir, weight_shards
from .gguf_arch import add_hparams, gguf_arch, gguf_name, heads_for, needs_permute, permute_rows
from .gguf_vocab import add_tokenizer

Q = gguf.GGMLQuantizationType
TYPES = {"f16": (Q.F16, gguf.LlamaFileType.MOSTLY_F16), "bf16": (Q.BF16, gguf.LlamaFileType.MOSTLY_BF16),
         "q8_0": (Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0)}


@dataclass
class GGUFResult:
    path: str
    arch: str
    tensors: int
    bytes: int
    tokenizer: str
    eos: Optional[int]
    eot: Optional[int]


def tensor_type(shape: tuple, out_type: str) -> "gguf.GGMLQuantizationType":
    """F32 for 1-D tensors (norms, biases); the requested type for matrices (F16 where q8_0 blocks do not fit)."""
    if len(shape) < 2:
        return Q.F32
    qtype = TYPES[out_type][0]
    if qtype == Q.Q8_0 and shape[-1] % gguf.GGML_QUANT_SIZES[Q.Q8_0][0] != 0:
        return Q.F16
    return qtype


def nbytes(shape: tuple, qtype) -> int:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape)) // block * size


def encode(a: np.ndarray, qtype) -> np.ndarray:
    """float32 array -> the bytes GGUF stores for `qtype`."""
    if qtype == Q.F32:
        return a.astype(np.float32)
    if qtype == Q.F16:
        return a.astype(np.float16)
    return gguf.quants.quantize(a.astype(np.float32), qtype)


def _sort_key(name: str) -> tuple:
    m = re.match(r"blk\.(\d+)\.", name)
    return (1, int(m.group(1)), name) if m else ((0,) if name.startswith("token_embd") else (2,)) + (0, name)


class StreamingGGUF:
    """Declare every tensor first (name, shape, type), then write their data one by one in that order."""

    def __init__(self, path: str, arch: str):
        self.path, self.tmp = path, path + f".tmp{os.getpid()}"
        self.writer = gguf.GGUFWriter(self.tmp, arch)
        self.order: list[str] = []

    def declare(self, name: str, shape: tuple, qtype) -> None:
        dtype = {Q.F32: np.float32, Q.F16: np.float16}.get(qtype, np.float32)
        raw = None if qtype in (Q.F32, Q.F16) else qtype
        self.writer.add_tensor_info(name, list(shape), np.dtype(dtype), nbytes(shape, qtype), raw_dtype=raw)
        self.order.append(name)

    def write_all(self, produce: Callable[[str], np.ndarray]) -> None:
        w = self.writer
        try:
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            for name in self.order:
                w.write_tensor_data(produce(name))
            w.close()
            os.replace(self.tmp, self.path)
        except BaseException:
            w.close()
            if os.path.exists(self.tmp):
                os.remove(self.tmp)
            raise


def export_gguf(model_dir: str, out_file: str, out_type: str = "bf16",
                log: Callable[[str], None] = print) -> GGUFResult:
    """Write `model_dir` (a transformers llama-family folder with safetensors weights) as GGUF.

    Args:
        model_dir: merged model folder.
        out_file: the .gguf file to write.
        out_type: "f16", "bf16" or "q8_0" for the weight matrices.
    """
    from safetensors import safe_open

    if out_type not in TYPES:
        raise FourbitError(f"--type must be one of {', '.join(TYPES)}, got `{out_type}`.")
    with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    arch = gguf_arch(config)
    handles, where = [], {}
    for path in weight_shards(model_dir):
        handles.append(safe_open(path, "pt"))
        where.update({k: handles[-1] for k in handles[-1].keys()})
    tied = config.get("tie_word_embeddings", True)
    names = {}
    for hf in where:
        g = gguf_name(hf)
        if g is None or (g == "output.weight" and tied):
            continue
        names[g] = hf
    ordered = sorted(names, key=_sort_key)
    n_vocab = int(config["vocab_size"])

    os.makedirs(os.path.dirname(os.path.abspath(out_file)), exist_ok=True)
    out = StreamingGGUF(out_file, arch)
    w = out.writer
    add_hparams(w, arch, config, os.path.basename(os.path.normpath(model_dir)))
    w.add_file_type(int(TYPES[out_type][1]))
    if out_type == "q8_0":
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    vocab = add_tokenizer(w, model_dir, n_vocab, log=log)
    types = {}
    for g in ordered:
        shape = tuple(where[names[g]].get_slice(names[g]).get_shape())
        types[g] = tensor_type(shape, out_type)
        out.declare(g, shape, types[g])

    def produce(g: str) -> np.ndarray:
        a = where[names[g]].get_tensor(names[g]).float().numpy()
        if needs_permute(arch, g):
            a = permute_rows(a, heads_for(config, g))
        if not np.isfinite(a).all():
            raise FourbitError(f"Tensor `{names[g]}` of `{model_dir}` has NaN or infinite values; "
                               "the model is broken. Re-merge it from a good checkpoint.")
        return encode(a, types[g])

    out.write_all(produce)
    size = os.path.getsize(out_file)
    return GGUFResult(path=out_file, arch=arch, tensors=len(ordered), bytes=size, tokenizer=vocab.model,
                      eos=vocab.eos, eot=vocab.eot)


def default_out(source: str, out_type: str, adapter_only: bool) -> str:
    src = os.path.normpath(source)
    if adapter_only:
        return os.path.join(src, f"adapter-{out_type}.gguf") if not os.path.isfile(
            os.path.join(src, "adapter_config.json")) else f"{src}-{out_type}.gguf"
    if is_model_dir(src):
        return f"{src}-{out_type}.gguf"
    return os.path.join(src, f"model-{out_type}.gguf")


def export_cmd(args: argparse.Namespace) -> int:
    """`fourbit export gguf SOURCE --type f16|bf16|q8_0 [--out FILE] [--adapter-only]`."""
    out = args.out or default_out(args.source, args.type, args.adapter_only)
    if args.adapter_only:
        from .gguf_lora import export_gguf_lora
        res = export_gguf_lora(args.source, out, args.type)
        print(f"wrote {res.path}: LoRA adapter for llama.cpp ({res.arch}, {res.pairs} A/B pairs, "
              f"alpha {res.alpha:g}), {res.bytes / 1e6:.1f} MB. Use it with: llama-cli -m BASE.gguf --lora {res.path}")
        return 0
    if is_model_dir(args.source):
        res = export_gguf(args.source, out, args.type)
    else:
        from .merge import merge_adapter
        if not os.path.exists(args.source):
            raise FourbitError(f"`{args.source}` does not exist. Pass a merged model folder or a run folder.")
        find_adapter(args.source)  # a clear error for anything that is neither a model nor an adapter
        with tempfile.TemporaryDirectory(prefix="fourbit-merge-") as tmp:
            print(f"{args.source} is a run/adapter folder: merging it first (default base) into a temporary folder")
            merge_adapter(args.source, os.path.join(tmp, "merged"), model=getattr(args, "model", None))
            res = export_gguf(os.path.join(tmp, "merged"), out, args.type)
    print(f"wrote {res.path}: {res.arch}, {res.tensors} tensors, {args.type}, {res.bytes / 1e6:.1f} MB, "
          f"tokenizer {res.tokenizer}, eos {res.eos}, end-of-turn {res.eot}")
    return 0


def read_back_logits(gguf_file: str, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits from transformers' independent GGUF reader (used by tests and `docs/export.md`)."""
    from transformers import AutoModelForCausalLM
    folder, name = os.path.split(os.path.abspath(gguf_file))
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=input_ids).logits

"""`fourbit merge`: fold a LoRA adapter into a 16-bit model folder, one shard at a time.

    W' = W + s * B @ A,   s = lora_alpha / r   (alpha / sqrt(r) with use_rslora)

where W is either the original 16-bit weight (`--base original`) or the NF4 round trip of it
that the adapter was trained against (`--base dequantized`). The sum is done in float32 and
rounded once to the output dtype.

Why our own code rather than peft's `merge_and_unload`: that needs the whole base model
instantiated (in 16 bits) plus the adapter; we stream the base checkpoint with safetensors'
`safe_open`, merge the tensors of one shard and write them out, so peak memory stays near one
shard however large the model is. The output is a plain transformers folder (sharded
safetensors + index, config without quantization_config, tokenizer files, chat template and a
generation config whose EOS ids include the end-of-turn token).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import struct
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..errors import FourbitError
from .adapter import Adapter, load_adapter, nf4_roundtrip, tokenizer_files, tokenizer_source, weight_shards

#: Measured on SmolLM2-135M-Instruct (docs/export.md): merging into the NF4-dequantized weights
#: reproduces the trained 4-bit model (KL ~1e-4) and gave the lower held-out loss.
DEFAULT_BASE = "dequantized"
#: Tokens that end an assistant turn in common chat templates; the one the template uses joins the EOS ids.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|end_of_turn|>", "<|eom_id|>")


@dataclass
class MergeResult:
    out_dir: str
    base: str                # "original" or "dequantized"
    merged_tensors: int      # how many weights got a LoRA update
    shards: int
    total_bytes: int
    eos_token_ids: list[int]
    seconds: float


def parse_size(text: str) -> int:
    """'2GB' -> 2e9 bytes, '500MiB' -> 500 * 2**20 (transformers' units)."""
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?i?B)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise FourbitError(f"--max-shard-size `{text}` is not a size; use e.g. 2GB, 500MB or 1GiB.")
    unit = (m.group(2) or "B").upper()
    power = {"B": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit[0]]
    return int(float(m.group(1)) * ((1024 if "I" in unit else 1000) ** power))


_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
             "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
_FLOATS = ("F16", "BF16", "F32", "F64")


class _SafetensorsStream:
    """Writes one safetensors file tensor by tensor.

    safetensors' `save_file` needs the whole shard in memory (and makes a bytes copy of it). The
    output shapes and dtypes of a merge are known before any weight is read, so we write the header
    first and then each tensor's bytes as soon as it is merged: peak memory is one tensor.
    Format: u64 little-endian header length, JSON header (padded to 8 bytes), raw little-endian data.
    """

    def __init__(self, path: str, specs: list[tuple[str, str, list[int]]]):
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for key, dtype, shape in specs:
            n = _ITEMSIZE[dtype] * math.prod(shape)
            header[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.f = open(path, "wb")
        self.f.write(struct.pack("<Q", len(raw)) + raw)
        self.pending = [(key, header[key]) for key, _, _ in specs]

    def write(self, key: str, t: torch.Tensor) -> None:
        want_key, info = self.pending.pop(0)
        assert key == want_key and list(t.shape) == info["shape"], (key, want_key)
        data = t.contiguous().reshape(-1).view(torch.uint8).numpy()
        assert data.nbytes == info["data_offsets"][1] - info["data_offsets"][0], key
        data.tofile(self.f)

    def close(self) -> None:
        assert not self.pending, "shard closed before all its tensors were written"
        self.f.close()


def _plan_shards(specs: list[tuple[str, str, list[int]]], max_bytes: int) -> list[list[tuple[str, str, list[int]]]]:
    """Group tensors (in checkpoint order) into shards of at most max_bytes (a bigger tensor gets its own)."""
    shards: list[list] = [[]]
    size = 0
    for spec in specs:
        n = _ITEMSIZE[spec[1]] * math.prod(spec[2])
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += n
    return shards


def _write_index(folder: str, names: list[str], shards: list[list], total: int) -> None:
    weight_map = {key: name for name, shard in zip(names, shards) for key, _, _ in shard}
    with open(os.path.join(folder, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def _check_against_base(adapter: Adapter, shapes: dict[str, tuple], tied: bool) -> None:
    for key, layer in adapter.layers.items():
        if key not in shapes:
            if tied and key == "lm_head.weight":
                raise FourbitError("The adapter trains lm_head, which this base model ties to the input embeddings; "
                                   "merging would untie them. Train without lm_head in lora.targets.")
            raise FourbitError(f"The adapter updates `{key}`, which the base model `{adapter.base_dir}` does not have. "
                               "The adapter was trained on another model: pass the right one with --model.")
        want = (layer.B.shape[0], layer.A.shape[1])
        if tuple(shapes[key][:2]) != want:
            raise FourbitError(f"The adapter's update for `{key}` has shape {want} but the base weight is "
                               f"{tuple(shapes[key])}: the adapter was trained on another model; pass it with --model.")
    for key in adapter.replaced:
        if key not in shapes:
            raise FourbitError(f"The adapter saves a full tensor `{key}` that the base model does not have; "
                               "pass the right base model with --model.")


def merge_adapter(source: str, out_dir: str, *, model: Optional[str] = None, base: Optional[str] = None,
                  dtype: str = "bfloat16", max_shard_size: str = "2GB",
                  log: Callable[[str], None] = print, adapter: Optional[Adapter] = None) -> MergeResult:
    """Merge a run's (or adapter folder's) LoRA into its base model and write a transformers folder.

    Args:
        source: run folder or adapter folder.
        out_dir: output folder (must not exist, or be empty).
        model: base model override (else the run config's `model`, else adapter_config's base).
        base: "original" or "dequantized" (None: DEFAULT_BASE).
        dtype: "bfloat16" or "float16" for the merged floating-point tensors.
        max_shard_size: largest output shard, e.g. "2GB".
    Returns:
        a MergeResult describing what was written.
    """
    from safetensors import safe_open

    t0 = time.time()
    base = base or DEFAULT_BASE
    if base not in ("original", "dequantized"):
        raise FourbitError(f"--base must be `original` or `dequantized`, got `{base}`.")
    adapter = adapter or load_adapter(source, model)
    for note in adapter.notes:
        log(f"note: {note}")
    if base == "dequantized" and adapter.quant.get("bits") in (None, "none"):
        log("note: the adapter was trained on a 16-bit base (quant.bits: none); merging into the original weights")
        base = "original"
    out_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise FourbitError(f"Output folder `{out_dir}` already exists and is not empty. Choose another --out "
                           "or remove it first.")
    shards = weight_shards(adapter.base_dir)
    with open(os.path.join(adapter.base_dir, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    specs, source_of = [], {}
    for path in shards:
        with safe_open(path, "pt") as f:
            for k in f.keys():
                sl = f.get_slice(k)
                dt = sl.get_dtype()
                specs.append((k, {"bfloat16": "BF16", "float16": "F16"}[dtype] if dt in _FLOATS else dt, sl.get_shape()))
                source_of[k] = path
    shapes = {k: tuple(shape) for k, _, shape in specs}
    tied = bool(config.get("tie_word_embeddings", (config.get("text_config") or {}).get("tie_word_embeddings")))
    _check_against_base(adapter, shapes, tied)
    plan = _plan_shards(specs, parse_size(max_shard_size))
    names = (["model.safetensors"] if len(plan) == 1 else
             [f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors" for i in range(len(plan))])
    total = sum(_ITEMSIZE[dt] * math.prod(shape) for _, dt, shape in specs)

    tmp = os.path.abspath(out_dir).rstrip("/") + f".tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    merged, handles = 0, {}
    try:
        for name, shard in zip(names, plan):
            out = _SafetensorsStream(os.path.join(tmp, name), shard)
            for key, _, _ in shard:
                path = source_of[key]
                if path not in handles:  # checkpoint order: each input shard is opened once, then closed
                    for h in handles.values():
                        h.__exit__(None, None, None)
                    handles = {path: safe_open(path, "pt").__enter__()}
                t = handles[path].get_tensor(key)
                if key in adapter.replaced:
                    t = adapter.replaced[key].to(t.dtype)
                if key in adapter.layers:
                    w = nf4_roundtrip(t, adapter.quant) if base == "dequantized" else t
                    t = w.float() + adapter.layers[key].delta()  # (out, in) in fp32, rounded once below
                    merged += 1
                if t.is_floating_point():
                    t = t.to(out_dtype)
                    if not torch.isfinite(t).all():
                        bad = int((~torch.isfinite(t)).sum())
                        hint = (" float16 overflows above 65504: use --dtype bfloat16." if dtype == "float16"
                                else " The adapter's weights are probably corrupt (a diverged run); "
                                     "merge an earlier checkpoint.")
                        raise FourbitError(f"Merged tensor `{key}` has {bad} NaN or infinite values.{hint}")
                out.write(key, t)
                del t
            out.close()
        for h in handles.values():
            h.__exit__(None, None, None)
        if len(plan) > 1:
            _write_index(tmp, names, plan, total)
        eos_ids = _write_side_files(adapter, tmp, config, out_dtype)
        if os.path.isdir(out_dir):
            os.rmdir(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return MergeResult(out_dir=out_dir, base=base, merged_tensors=merged, shards=len(plan),
                       total_bytes=total, eos_token_ids=eos_ids, seconds=time.time() - t0)


def end_of_turn_token(tokenizer) -> Optional[str]:
    """The end-of-turn token the chat template writes, if it is one we know and it is in the vocabulary."""
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
    vocab = tokenizer.get_vocab()
    for tok in END_OF_TURN_TOKENS:
        if tok in template and tok in vocab:
            return tok
    return None


def _write_side_files(adapter: Adapter, folder: str, config: dict, out_dtype: torch.dtype) -> list[int]:
    """config.json, tokenizer files, generation_config.json. Returns the EOS ids written."""
    from transformers import AutoTokenizer

    config = {k: v for k, v in config.items() if k != "quantization_config"}
    config["dtype"] = str(out_dtype).replace("torch.", "")
    config.pop("torch_dtype", None)
    tok_dir = tokenizer_source(adapter)
    for name in tokenizer_files(tok_dir):
        shutil.copy2(os.path.join(tok_dir, name), os.path.join(folder, name))
    tok = AutoTokenizer.from_pretrained(folder) if tokenizer_files(folder) else None
    gen_path = os.path.join(adapter.base_dir, "generation_config.json")
    gen = {}
    if os.path.isfile(gen_path):
        with open(gen_path, encoding="utf-8") as f:
            gen = json.load(f)
    eos: list[int] = []
    for value in (gen.get("eos_token_id"), config.get("eos_token_id"), tok.eos_token_id if tok else None):
        for i in (value if isinstance(value, list) else [value]):
            if isinstance(i, int) and i not in eos:
                eos.append(i)
    eot = end_of_turn_token(tok) if tok else None
    if eot is not None and tok.convert_tokens_to_ids(eot) not in eos:
        eos.append(tok.convert_tokens_to_ids(eot))
    for key in ("bos_token_id", "pad_token_id"):
        value = config.get(key, getattr(tok, key, None))
        if value is not None:
            gen.setdefault(key, value)
    if eos:
        gen["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(folder, "generation_config.json"), "w", encoding="utf-8") as f:
        json.dump(gen, f, indent=2)
    return eos


def merge_cmd(args: argparse.Namespace) -> int:
    """`fourbit merge SOURCE --out DIR [--base] [--model] [--dtype] [--max-shard-size] [--eval-data]`."""
    from .drift import drift_report

    adapter = load_adapter(args.source, args.model)
    res = merge_adapter(args.source, args.out, model=args.model, base=args.base, dtype=args.dtype,
                        max_shard_size=args.max_shard_size, adapter=adapter)
    how = "default" if args.base is None else "--base"
    print(f"merged {res.merged_tensors} LoRA weights into the {res.base} base ({how}) of {adapter.base_dir}")
    print(f"wrote {res.out_dir}: {res.shards} shard(s), {res.total_bytes / 1e6:.1f} MB {args.dtype}, "
          f"EOS ids {res.eos_token_ids}, {res.seconds:.1f}s")
    drift_report(adapter, res.out_dir, args.eval_data, dtype=args.dtype)
    return 0

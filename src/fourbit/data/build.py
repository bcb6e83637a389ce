"""`build_examples`: rows -> validated samples -> token ids + labels, with counts, a cache and workers.

The cache is ours (not `datasets.map`'s) because its key must cover what actually changes the
tokens: the data's bytes, the tokenizer's full state and chat template, and the data settings that
affect rendering. `datasets` fingerprints the mapped *function*, which misses a changed tokenizer
file and re-tokenizes when unrelated code changes. Entries are one .npz each (no pickle), written to
a temporary name and renamed into place, so a killed run never leaves a half-written entry.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
from functools import partial
from typing import Optional

import numpy as np

from ..errors import DataError
from .render import IGNORE, encode, get_chat_template, template_notes
from .report import DataReport, Example
from .sources import BadRow, read_rows, source_fingerprint
from .validate import FIX, RowProblem, detect_format, to_sample

CACHE_VERSION = "fourbit-data-1"          # bump when rendering/masking changes, so old entries are not reused
PARALLEL_MIN_ROWS = 20000                 # below this, worker start-up costs more than it saves


def cache_dir() -> str:
    root = os.environ.get("FOURBIT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fourbit")
    return os.path.join(root, "data")


def _tokenizer_fingerprint(tokenizer) -> str:
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(f"{getattr(tokenizer, 'name_or_path', '')}|{len(tokenizer)}".encode())
    h.update(repr((type(tokenizer).__name__, getattr(tokenizer, "chat_template", None), tokenizer.eos_token_id,
                   tokenizer.bos_token_id, sorted(map(str, tokenizer.all_special_tokens)))).encode())
    return h.hexdigest()


def _cache_key(source: str, tokenizer, cfg, split: str) -> Optional[str]:
    data = source_fingerprint(source)
    if data is None:
        return None
    tmpl = cfg.chat_template
    if tmpl and os.path.isfile(tmpl):
        with open(tmpl, encoding="utf-8") as f:
            tmpl = f.read()
    settings = (CACHE_VERSION, split, cfg.format, cfg.max_length, tmpl, cfg.train_on, cfg.last_turn_only,
                cfg.truncation, cfg.on_bad_row)
    return hashlib.sha256(f"{data}|{_tokenizer_fingerprint(tokenizer)}|{settings!r}".encode()).hexdigest()[:32]


def _load_cached(key: str) -> Optional[tuple[list[Example], DataReport]]:
    path = os.path.join(cache_dir(), key + ".npz")
    if not os.path.isfile(path):
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            ids, mask, offsets = z["ids"], z["mask"], z["offsets"]
            report = DataReport.from_dict(json.loads(bytes(z["report"]).decode("utf-8")))
    except Exception:  # a corrupt or foreign file: tokenize again and overwrite it
        return None
    labels = np.where(mask, ids, IGNORE)
    examples = [Example(ids[a:b].tolist(), labels[a:b].tolist()) for a, b in zip(offsets[:-1], offsets[1:])]
    report.from_cache = True
    return examples, report


def _store(key: str, examples: list[Example], report: DataReport) -> None:
    d = cache_dir()
    try:
        os.makedirs(d, exist_ok=True)
        ids = np.fromiter((t for e in examples for t in e.input_ids), dtype=np.int32)
        mask = np.fromiter((lab != IGNORE for e in examples for lab in e.labels), dtype=bool)
        offsets = np.cumsum([0] + [len(e.input_ids) for e in examples]).astype(np.int64)
        blob = np.frombuffer(json.dumps(report.to_dict()).encode("utf-8"), dtype=np.uint8)
        tmp = os.path.join(d, f".{key}.{os.getpid()}.tmp.npz")
        np.savez(tmp, ids=ids, mask=mask, offsets=offsets, report=blob)
        os.replace(tmp, os.path.join(d, key + ".npz"))
    except OSError as e:
        report.notes.append(f"could not write the tokenization cache in {d} ({e.strerror}); the next run "
                            "tokenizes again (set FOURBIT_CACHE to a writable folder)")


def _process(items: list, fmt: str, tokenizer, template: Optional[str], opts: dict) -> list[tuple]:
    """One outcome per item: ("ok", ids, labels, truncated) | ("skip", reason, where, msg) |
    ("drop", reason) | ("error", message)."""
    out = []
    max_len = opts["max_length"]
    for item in items:
        if isinstance(item, BadRow):
            out.append(("skip", item.reason, item.where, item.message))
            continue
        try:
            ids, labels = encode(to_sample(item.value, fmt), tokenizer, template, opts["train_on"],
                                 opts["last_turn_only"])
        except RowProblem as p:
            out.append(("skip", p.reason, item.where, p.message))
            continue
        if not any(lab != IGNORE for lab in labels):
            out.append(("drop", "no trainable tokens"))
            continue
        truncated = len(ids) > max_len
        if truncated:
            if opts["truncation"] == "error":
                out.append(("error", f"{item.where}: the example has {len(ids)} tokens, more than data.max_length "
                                     f"{max_len}. Raise data.max_length, shorten the row, or set data.truncation: "
                                     "end (cut it) or drop (skip it, counted)."))
                continue
            if opts["truncation"] == "drop":
                out.append(("drop", "longer than max_length"))
                continue
            ids, labels = ids[:max_len], labels[:max_len]
            if not any(lab != IGNORE for lab in labels):
                out.append(("drop", "no trainable tokens after truncation"))
                continue
        out.append(("ok", ids, labels, truncated))
    return out


def _run(items: list, fmt: str, tokenizer, template, opts: dict, num_proc: int) -> list[tuple]:
    if num_proc == 0:
        num_proc = min(8, os.cpu_count() or 1) if len(items) >= PARALLEL_MIN_ROWS else 1
    if num_proc <= 1 or len(items) < 2:
        return _process(items, fmt, tokenizer, template, opts)
    n_chunks = num_proc * 4
    size = -(-len(items) // n_chunks)
    chunks = [items[i:i + size] for i in range(0, len(items), size)]
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    with mp.get_context(method).Pool(num_proc) as pool:
        parts = pool.map(partial(_process, fmt=fmt, tokenizer=tokenizer, template=template, opts=opts), chunks)
    return [o for part in parts for o in part]


def build_examples(source: str, tokenizer, cfg, split: str = "train") -> tuple[list[Example], DataReport]:
    """Read, validate, render and tokenize `source`; returns the trainable examples and the counts.

    Args:
        source: a data file, a folder of them, or a hub dataset name (`name` or `name:split`).
        tokenizer: a transformers tokenizer (fast tokenizers give exact masks from offsets).
        cfg: the DataConfig (format, max_length, chat_template, train_on, last_turn_only, truncation,
            on_bad_row, num_proc).
        split: "train" or "eval" (for the report and the cache key).
    Raises:
        DataError: a bad row (on_bad_row: error), a too-long example (truncation: error), no template,
            or no examples left.
    """
    if not source:
        raise DataError(f"No data given for the {split} split: set data.{split} to a .jsonl/.json/.parquet/.csv "
                        "file, a folder of them, or a hub dataset name.")
    key = _cache_key(source, tokenizer, cfg, split)
    cached = _load_cached(key) if key else None
    if cached is not None:
        return cached
    items = list(read_rows(source))
    report = DataReport(source=source, split=split, max_length=cfg.max_length, rows_read=len(items))
    fmt = cfg.format
    if fmt == "auto":
        rows = [it for it in items if not isinstance(it, BadRow)]
        first = next((it for it in rows if isinstance(it.value, dict)), rows[0] if rows else None)
        if first is None:
            raise DataError(f"{source}: no readable row (every row is broken; the first: {items[0].where}: "
                            f"{items[0].message}).")
        fmt = detect_format(first.value, first.where)
    report.format = fmt
    template = None
    if fmt in ("messages", "alpaca"):
        template = get_chat_template(tokenizer, cfg.chat_template)
        report.template = ("tokenizer's" if not cfg.chat_template else
                           "chatml" if cfg.chat_template.lower() == "chatml" else "custom")
        report.notes += template_notes(tokenizer, template)
    opts = dict(max_length=cfg.max_length, train_on=cfg.train_on, last_turn_only=cfg.last_turn_only,
                truncation=cfg.truncation)
    examples = []
    for o in _run(items, fmt, tokenizer, template, opts, cfg.num_proc):
        if o[0] == "ok":
            _, ids, labels, truncated = o
            examples.append(Example(ids, labels))
            report.truncated += truncated
            report.tokens += len(ids)
            report.trainable_tokens += sum(lab != IGNORE for lab in labels)
            report.lengths.append(len(ids))
        elif o[0] == "skip":
            _, reason, where, msg = o
            if cfg.on_bad_row == "error":
                raise DataError(f"{where}: {msg}. {FIX}")
            report.count("skipped", reason, f"{where}: {msg}")
        elif o[0] == "drop":
            report.count("dropped", o[1])
        else:
            raise DataError(o[1])
    report.examples = len(examples)
    if not examples:
        raise DataError(f"{source}: no trainable examples are left out of {report.rows_read} rows.\n"
                        + report.summary())
    if key:
        _store(key, examples, report)
    return examples, report

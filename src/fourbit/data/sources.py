"""Read raw rows from jsonl / json / parquet / csv files, folders of them, or a hub dataset.

Each row comes with a human location (`data/train.jsonl, line 7`) so every later error can name the
file and the row. We read jsonl, json and csv ourselves instead of through `datasets` because
`datasets` turns one bad line (invalid UTF-8, broken JSON) into an opaque Arrow error about the whole
file; here a bad line becomes one `BadRow` that the caller reports or skips and counts. Parquet is
typed by construction and hub datasets are already parsed, so those go through pyarrow / `datasets`.
"""
from __future__ import annotations

import csv
import glob
import io
import json
import os
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Union

from ..errors import DataError

FILE_TYPES = (".jsonl", ".json", ".parquet", ".csv")


@dataclass
class Row:
    where: str          # "data/train.jsonl, line 7"
    value: Any          # the parsed row (normally a dict)


@dataclass
class BadRow:
    where: str
    reason: str         # short key for counting: "invalid UTF-8", "invalid JSON", ...
    message: str        # one sentence: what is wrong (no location, no fix)


Item = Union[Row, BadRow]


def source_files(source: str) -> list[str]:
    """The data files a source names: one file, or every supported file in a folder (sorted)."""
    if os.path.isdir(source):
        files = sorted(f for f in glob.glob(os.path.join(source, "**", "*"), recursive=True)
                       if f.endswith(FILE_TYPES) and os.path.isfile(f))
        if not files:
            raise DataError(f"Data folder {source} holds no .jsonl, .json, .parquet or .csv files. "
                            "Point data.train / data.eval at a data file or a folder of them.")
        return files
    if os.path.isfile(source):
        if not source.endswith(FILE_TYPES):
            raise DataError(f"Data file {source} has an unsupported type; use .jsonl, .json, .parquet or .csv.")
        return [source]
    return []


def is_local(source: str) -> bool:
    return os.path.exists(source) or source.endswith(FILE_TYPES) or source.startswith((".", "/", "~"))


def read_rows(source: str) -> Iterator[Item]:
    """Yield every row of `source` (file, folder or hub name) with its location, in order."""
    if not is_local(source):
        yield from _read_hub(source)
        return
    files = source_files(source)
    if not files:
        raise DataError(f"Data file {source} not found. Check data.train / data.eval (a path relative to "
                        "where you run fourbit, or a hub dataset name such as `org/name:train`).")
    for path in files:
        if os.path.getsize(path) == 0:
            raise DataError(f"{path} is empty (0 bytes). Point the config at a file with rows, or remove it.")
        n = 0
        reader = {".jsonl": _read_jsonl, ".json": _read_json, ".parquet": _read_parquet, ".csv": _read_csv}
        for item in reader[os.path.splitext(path)[1]](path):
            n += 1
            yield item
        if n == 0:
            raise DataError(f"{path} has no rows (only blank lines or a header). Point the config at a file with rows.")


def _utf8_error(e: UnicodeDecodeError) -> str:
    return f"not valid UTF-8 (byte 0x{e.object[e.start]:02x} at byte {e.start + 1} of the line)"


def _read_jsonl(path: str) -> Iterator[Item]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}, line {lineno}"
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield BadRow(where, "invalid UTF-8", _utf8_error(e))
                continue
            if lineno == 1:
                text = text.lstrip("\ufeff")
            if not text.strip():
                continue                                      # a blank line is not a row
            try:
                yield Row(where, json.loads(text))
            except json.JSONDecodeError as e:
                yield BadRow(where, "invalid JSON", f"not valid JSON ({e.msg} at column {e.colno})")


def _read_json(path: str) -> Iterator[Item]:
    with open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8").lstrip("\ufeff")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise DataError(f"{path}, line {line}: not valid UTF-8 (byte 0x{data[e.start]:02x}). A .json file is read "
                        "as a whole, so one bad byte stops it; re-save it as UTF-8 (or convert it to .jsonl, where "
                        "data.on_bad_row: skip can skip single lines).") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":                             # JSON lines saved with a .json name
            yield from _read_jsonl(path)
            return
        raise DataError(f"{path}, line {e.lineno}: not valid JSON ({e.msg} at column {e.colno}). "
                        "Fix the file; a .json file must hold one JSON list of rows.") from None
    if isinstance(obj, dict) and len(obj) == 1 and isinstance(next(iter(obj.values())), list):
        obj = next(iter(obj.values()))                        # {"data": [...]}
    if not isinstance(obj, list):
        raise DataError(f"{path}: the file holds a JSON {type(obj).__name__}, not a list of rows. "
                        "Write the rows as a JSON list, or one JSON object per line in a .jsonl file.")
    for i, value in enumerate(obj, 1):
        yield Row(f"{path}, row {i}", value)


def _read_parquet(path: str) -> Iterator[Item]:
    import pyarrow.parquet as pq
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise DataError(f"{path}: cannot read it as parquet ({e}). Check the file.") from None
    for i, value in enumerate(table.to_pylist(), 1):
        yield Row(f"{path}, row {i}", value)


def _read_csv(path: str) -> Iterator[Item]:
    with open(path, "rb") as f:
        data = f.read()
    lines = data.split(b"\n")
    decoded = []
    bad_lines: dict[int, str] = {}
    for lineno, raw in enumerate(lines, 1):
        try:
            decoded.append(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            bad_lines[lineno] = _utf8_error(e)
            decoded.append(raw.decode("utf-8", errors="replace"))
    reader = csv.DictReader(io.StringIO("\n".join(decoded).lstrip("\ufeff"), newline=""))
    start = 2
    for record in reader:
        end = reader.line_num
        where = f"{path}, line {start}"
        bad = [n for n in range(start, end + 1) if n in bad_lines]
        if bad:
            yield BadRow(where, "invalid UTF-8", bad_lines[bad[0]])
        else:
            value = {k: v for k, v in record.items() if k is not None}
            for k, v in value.items():                         # a JSON list in a cell, e.g. the messages column
                if isinstance(v, str) and v[:1] == "[" and k == "messages":
                    try:
                        value[k] = json.loads(v)
                    except json.JSONDecodeError:
                        pass
            yield Row(where, value)
        start = end + 1


def _read_hub(source: str) -> Iterator[Item]:
    import datasets
    name, _, split = source.partition(":")
    split = split or "train"
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # datasets raises many types (not found, offline, no such split)
        raise DataError(f"Cannot load dataset `{name}` (split `{split}`) from the hub or the datasets cache: "
                        f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. Check the name, the split "
                        "(`name:split`) and your connection, or point data.train at a local file.") from None
    for i, value in enumerate(ds, 1):
        yield Row(f"{name} ({split}), row {i}", value)


def source_fingerprint(source: str) -> Optional[str]:
    """A string that changes when the data changes: file contents (sha256) or the hub dataset's fingerprint
    (None when it cannot be known, and then nothing is cached)."""
    import hashlib
    if not is_local(source):
        import datasets
        name, _, split = source.partition(":")
        try:
            ds = datasets.load_dataset(name, split=split or "train")
        except Exception:
            return None
        return f"hub:{source}:{getattr(ds, '_fingerprint', '')}"
    h = hashlib.sha256()
    for path in source_files(source):
        h.update(os.path.abspath(path).encode() + b"\0")
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()

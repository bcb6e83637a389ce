"""Reading files and validating rows: every bad row is named (file, line, field) or skipped and counted."""
import json

import pytest

from fourbit.config import DataConfig
from fourbit.data import build_examples
from fourbit.errors import DataError

GOOD = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FOURBIT_CACHE", str(tmp_path / "cache"))


def jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def conv(*turns):
    return {"messages": [{"role": r, "content": c} for r, c in turns]}


BAD = [  # (row, reason, words the message must contain)
    (conv(("user", "Hi"), ("assitant", "Yo")), "unknown role", 'message 2 has role "assitant"'),
    ({"messages": []}, "empty conversation", "empty list"),
    (conv(("user", "Hi"), ("assistant", "  ")), "empty message", "message 2 (assistant) has empty content"),
    (conv(("user", "Hi"), ("system", "S"), ("assistant", "Yo")), "system not first", "message 2 is a system"),
    (conv(("user", "Hi"), ("user", "Hi"), ("assistant", "Yo")), "consecutive turns", "messages 1 and 2 are both user"),
    (conv(("system", "S"), ("assistant", "Yo"), ("user", "Hi")), "assistant before user", "message 2 is an assistant"),
    ({"messages": "hi"}, "wrong type", "`messages` must be a list"),
    ({"messages": [{"role": "user"}]}, "missing field", "message 1 has no `content`"),
    ({"messages": [{"role": "user", "content": 3}]}, "wrong type", "message 1 (user) has int content"),
    ({"prompt": "x"}, "missing field", "field `messages` is missing"),
    (conv(("user", "Hi")), "no assistant turn", "no assistant turn"),
    ("[1, 2]", "wrong type", "JSON list, not an object"),
    ('{"messages": [', "invalid JSON", "not valid JSON"),
]


@pytest.mark.parametrize("row,reason,words", BAD)
def test_bad_row_error_names_file_line_and_fix(tmp_path, smol_tokenizer, row, reason, words):
    f = jsonl(tmp_path / "train.jsonl", [GOOD, GOOD, row, GOOD])
    with pytest.raises(DataError) as e:
        build_examples(f, smol_tokenizer, DataConfig(format="messages"))
    msg = str(e.value)
    assert msg.startswith(f"{f}, line 3: ") and words in msg
    assert msg.endswith("Fix the row or set data.on_bad_row: skip.") and "\n" not in msg


def test_skip_counts_every_reason(tmp_path, smol_tokenizer):
    rows = [GOOD] + [r for r, _, _ in BAD] + [GOOD]
    f = jsonl(tmp_path / "train.jsonl", rows)
    examples, rep = build_examples(f, smol_tokenizer, DataConfig(format="messages", on_bad_row="skip"))
    assert len(examples) == rep.examples == 2
    expected = {}
    for _, reason, _ in BAD:
        expected[reason] = expected.get(reason, 0) + 1
    assert rep.skipped == expected
    assert rep.rows_read == rep.examples + sum(rep.skipped.values()) + sum(rep.dropped.values())
    s = rep.summary()
    assert f"skipped bad rows {len(BAD)}" in s and "unknown role: 1" in s and "line 3" in s


def test_invalid_utf8_names_line(tmp_path, smol_tokenizer):
    p = tmp_path / "train.jsonl"
    p.write_bytes(json.dumps(GOOD).encode() + b"\n" + b'{"text": "caf\xe9"}\n' + json.dumps(GOOD).encode() + b"\n")
    with pytest.raises(DataError, match=r"train.jsonl, line 2: not valid UTF-8 \(byte 0xe9"):
        build_examples(str(p), smol_tokenizer, DataConfig())
    ex, rep = build_examples(str(p), smol_tokenizer, DataConfig(on_bad_row="skip"))
    assert len(ex) == 2 and rep.skipped == {"invalid UTF-8": 1}


def test_empty_files_and_missing(tmp_path, smol_tokenizer):
    p = tmp_path / "empty.jsonl"
    p.write_bytes(b"")
    with pytest.raises(DataError, match="empty.jsonl is empty"):
        build_examples(str(p), smol_tokenizer, DataConfig())
    p.write_text("\n  \n")
    with pytest.raises(DataError, match="has no rows"):
        build_examples(str(p), smol_tokenizer, DataConfig())
    with pytest.raises(DataError, match="not found"):
        build_examples(str(tmp_path / "nope.jsonl"), smol_tokenizer, DataConfig())


def test_undetectable_format(tmp_path, smol_tokenizer):
    f = jsonl(tmp_path / "t.jsonl", [{"question": "a", "answer": "b"}])
    with pytest.raises(DataError, match=r"line 1: cannot tell the data format from the fields \(answer, question\)"):
        build_examples(f, smol_tokenizer, DataConfig())


def test_alpaca_and_prompt_completion_fields(tmp_path, smol_tokenizer):
    f = jsonl(tmp_path / "a.jsonl", [{"instruction": "Add", "output": "4"}, {"instruction": "Add", "output": 4}])
    with pytest.raises(DataError, match=r"line 2: field `output` must be a string, got int"):
        build_examples(f, smol_tokenizer, DataConfig())
    f = jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": "a"}])
    with pytest.raises(DataError, match=r"line 2: field `completion` is missing"):
        build_examples(f, smol_tokenizer, DataConfig(format="prompt_completion"))


def test_json_csv_parquet_and_folder(tmp_path, smol_tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq
    d = tmp_path / "data"
    d.mkdir()
    (d / "a.json").write_text(json.dumps([{"prompt": "1+1=", "completion": "2"},
                                          {"prompt": "2+2=", "completion": "4"}]))
    (d / "b.csv").write_text('prompt,completion\n"multi\nline",x\n3+3=,6\n')
    pq.write_table(pa.table({"prompt": ["4+4="], "completion": ["8"]}), str(d / "c.parquet"))
    ex, rep = build_examples(str(d), smol_tokenizer, DataConfig())
    assert rep.format == "prompt_completion" and len(ex) == 5
    assert smol_tokenizer.decode(ex[2].input_ids).startswith("multi\nline")
    (d / "b.csv").write_text('prompt,completion\n"multi\nline",x\n3+3=,\n')
    with pytest.raises(DataError, match=r"b.csv, line 4: field `completion` is empty"):
        build_examples(str(d), smol_tokenizer, DataConfig())
    (tmp_path / "m.csv").write_text('messages\n"[{""role"": ""user"", ""content"": ""hi""}, '
                                    '{""role"": ""assistant"", ""content"": ""yo""}]"\n')
    ex, rep = build_examples(str(tmp_path / "m.csv"), smol_tokenizer, DataConfig())
    assert rep.format == "messages" and len(ex) == 1


def test_hub_name_that_cannot_load_is_a_clear_error(smol_tokenizer):
    with pytest.raises(DataError, match="Cannot load dataset `fourbit-test/does-not-exist`"):
        build_examples("fourbit-test/does-not-exist:train", smol_tokenizer, DataConfig())

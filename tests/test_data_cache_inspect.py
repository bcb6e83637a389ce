"""Tokenization cache, parallel tokenization, `fourbit data inspect`, and the packing/use_cache contract."""
import json
import os

import pytest
import torch
import yaml

from fourbit.cli import main
from fourbit.config import DataConfig
from fourbit.data import build_examples, cache_dir, collate, pack_examples
from fourbit.data.inspect import length_histogram, render_example, start_summary
from fourbit.data.pack import padding_stats


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FOURBIT_CACHE", str(tmp_path / "cache"))


def rows(n):
    return [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                          {"role": "assistant", "content": f"{i} plus {i} is {2 * i}." + " Indeed." * (i % 7)}]}
            for i in range(n)]


def write(path, data):
    path.write_text("".join(json.dumps(r) + "\n" for r in data))
    return str(path)


def test_cache_hit_and_invalidation(tmp_path, smol_tokenizer):
    f = write(tmp_path / "d.jsonl", rows(20))
    ex1, rep1 = build_examples(f, smol_tokenizer, DataConfig())
    assert not rep1.from_cache
    assert os.path.dirname(cache_dir()) == str(tmp_path / "cache")
    assert len([p for p in os.listdir(cache_dir()) if p.endswith(".npz")]) == 1
    ex2, rep2 = build_examples(f, smol_tokenizer, DataConfig())
    assert rep2.from_cache and "from cache" in rep2.summary()
    assert [(e.input_ids, e.labels) for e in ex1] == [(e.input_ids, e.labels) for e in ex2]
    assert (rep2.tokens, rep2.trainable_tokens, rep2.lengths) == (rep1.tokens, rep1.trainable_tokens, rep1.lengths)
    # a relevant setting, the eval split, or the data itself changes -> tokenized again
    assert not build_examples(f, smol_tokenizer, DataConfig(last_turn_only=True, train_on="all"))[1].from_cache
    assert not build_examples(f, smol_tokenizer, DataConfig(), split="eval")[1].from_cache
    assert build_examples(f, smol_tokenizer, DataConfig(packing=True, shuffle=False))[1].from_cache  # no effect
    write(tmp_path / "d.jsonl", rows(21))
    assert not build_examples(f, smol_tokenizer, DataConfig())[1].from_cache


def test_cache_keyed_on_tokenizer_template(tmp_path, smol_tokenizer_dir):
    from transformers import AutoTokenizer
    f = write(tmp_path / "d.jsonl", rows(3))
    tok = AutoTokenizer.from_pretrained(smol_tokenizer_dir)
    build_examples(f, tok, DataConfig())
    tok.chat_template = tok.chat_template.replace("<|im_start|>", "<|im_start|> ")
    ex, rep = build_examples(f, tok, DataConfig())
    assert not rep.from_cache and tok.decode(ex[0].input_ids).startswith("<|im_start|> ")


def test_parallel_equals_serial(tmp_path, smol_tokenizer):
    f = write(tmp_path / "d.jsonl", rows(24) + [{"messages": []}])
    serial, rs = build_examples(f, smol_tokenizer, DataConfig(num_proc=1, on_bad_row="skip"))
    os.remove(os.path.join(cache_dir(), os.listdir(cache_dir())[0]))
    par, rp = build_examples(f, smol_tokenizer, DataConfig(num_proc=2, on_bad_row="skip"))
    assert not rp.from_cache
    assert [(e.input_ids, e.labels) for e in serial] == [(e.input_ids, e.labels) for e in par]
    assert rs.skipped == rp.skipped == {"empty conversation": 1}


def test_render_example_and_histogram(tmp_path, smol_tokenizer):
    (ex, *_), rep = build_examples(write(tmp_path / "d.jsonl", rows(3)), smol_tokenizer, DataConfig())
    plain = render_example(smol_tokenizer, ex, color=False)
    assert plain.endswith("<|im_start|>assistant\n[[0 plus 0 is 0.<|im_end|>]]\n")
    colored = render_example(smol_tokenizer, ex, color=True)
    assert "\033[1;32m0 plus 0 is 0.<|im_end|>\033[0m" in colored
    hist = length_histogram([1, 5, 10, 10, 64], 64, bins=4)
    assert hist.splitlines()[0].split()[:2] == ["1-16", "4"] and len(hist.splitlines()) == 4
    st = padding_stats(rep.lengths, 1024, 2, pack_examples([ex] * 3, 1024))
    assert "packing: 3 examples in 1 rows" in start_summary(rep, packing=st)


def _config(tmp_path, model_dir, data, **data_cfg):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"model": model_dir, "data": {"train": data, **data_cfg}}))
    return str(cfg)


def test_inspect_cli(tmp_path, tiny_model_dir, capsys):
    data = write(tmp_path / "d.jsonl", rows(30))
    assert main(["data", "inspect", _config(tmp_path, tiny_model_dir, data, max_length=128), "--color", "never",
                 "--index", "2"]) == 0
    out = capsys.readouterr().out
    assert "30 rows -> 30 examples" in out and "token lengths (max_length 128):" in out
    assert "trained tokens:" in out and "truncated: 0" in out and "padding at micro_batch_size 2:" in out
    assert "[[2 plus 2 is 4. Indeed. Indeed.<|im_end|>]]" in out
    assert main(["data", "inspect", _config(tmp_path, tiny_model_dir, data), "--color", "always"]) == 0
    assert "\033[1;32m" in capsys.readouterr().out


def test_cli_data_error_is_one_paragraph(tmp_path, tiny_model_dir, capsys):
    data = write(tmp_path / "d.jsonl", rows(2) + [{"messages": [{"role": "user", "content": "a"},
                                                                 {"role": "assitant", "content": "b"}]}])
    assert main(["data", "inspect", _config(tmp_path, tiny_model_dir, data)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"fourbit: error: {data}, line 3: message 2 has role \"assitant\"")
    assert "Traceback" not in err and err.strip().endswith("set data.on_bad_row: skip.")


def test_packing_needs_no_mask_and_no_cache(tiny_model_dir):
    """Why collate sends no attention_mask with packed rows and the trainer passes use_cache=False:
    transformers derives the block mask from position_ids only without a 2D mask and without a cache."""
    from transformers import AutoModelForCausalLM
    from fourbit.data import Example
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
    a, b = Example(list(range(100, 110)), list(range(100, 110))), Example(list(range(200, 207)), list(range(200, 207)))
    packed = collate([a, b], 0, packed_groups=[[0, 1]])
    alone = collate([b], 0)
    kw = {k: v for k, v in packed.items() if k != "labels"}
    with torch.no_grad():
        ref = model(input_ids=alone["input_ids"], use_cache=False).logits[0]
        good = model(**kw, use_cache=False).logits[0, 10:]
        with_cache = model(**kw, use_cache=True).logits[0, 10:]
        with_mask = model(**kw, attention_mask=torch.ones_like(kw["input_ids"]), use_cache=False).logits[0, 10:]
    torch.testing.assert_close(good, ref, atol=2e-5, rtol=1e-4)
    assert (with_cache - ref).abs().max() > 1e-2 and (with_mask - ref).abs().max() > 1e-2

"""Packing, collate and truncation; packed logits equal unpacked ones per example on a tiny Llama."""
import json
import random

import pytest
import torch

from fourbit.config import DataConfig
from fourbit.data import Example, build_examples, collate, pack_examples, padding_stats
from fourbit.errors import DataError

WORDS = "the cat sat on a mat while seven quick foxes jumped over lazy dogs near old river banks".split()


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FOURBIT_CACHE", str(tmp_path / "cache"))


def varied_jsonl(path, n, seed=0, lo=1, hi=40):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        q = " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))
        a = " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))
        rows.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def ex(n, start=1):
    ids = list(range(start, start + n))
    return Example(ids, [-100] + ids[1:])


def test_best_fit_packing():
    lengths = [6, 5, 4, 4, 3, 2, 1, 5]
    examples = [ex(n) for n in lengths]
    groups = pack_examples(examples, 10)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in g) <= 10 for g in groups)
    assert len(groups) == 3                                      # 30 tokens: three full rows
    assert pack_examples(examples, 10) == groups                 # deterministic
    assert pack_examples([ex(12)], 10) == [[0]]                  # an over-long example stays alone


def test_collate_unpacked():
    b = collate([ex(3), ex(5)], pad_id=99)
    assert b["input_ids"].shape == (2, 5)
    assert b["input_ids"][0].tolist() == [1, 2, 3, 99, 99]
    assert b["labels"][0].tolist() == [-100, 2, 3, -100, -100]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1] * 5]
    assert b["position_ids"][1].tolist() == [0, 1, 2, 3, 4]
    b = collate([ex(3)], pad_id=99, max_length=6)
    assert b["input_ids"].shape == (1, 6)
    # padding is masked by position: a pad id equal to a trained token (SmolLM2: pad == eos) keeps its label
    b = collate([ex(3), ex(5)], pad_id=3)
    assert b["labels"][0].tolist() == [-100, 2, 3, -100, -100] and b["labels"][1, 2].item() == 3


def test_collate_packed_positions_labels_padding():
    examples = [Example([5, 6, 7], [5, 6, 7]), Example([8, 9], [8, 9]), Example([10, 11, 12, 13], [-100, 11, 12, 13])]
    b = collate(examples, pad_id=0, packed_groups=[[0, 1], [2]], max_length=7)
    assert "attention_mask" not in b                             # block mask comes from position_ids
    assert b["input_ids"].tolist() == [[5, 6, 7, 8, 9, 0, 0], [10, 11, 12, 13, 0, 0, 0]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1], [0, 1, 2, 3, 0, 1, 2]]
    # first token of every packed example is never a target (label -100), even with train_on: all
    assert b["labels"].tolist() == [[-100, 6, 7, -100, 9, -100, -100], [-100, 11, 12, 13, -100, -100, -100]]
    flat = collate(examples, pad_id=0, packed_groups=[[0, 1], [2]], max_length=7,
                   attn_implementation="flash_attention_2")
    assert flat["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10, 11, 12, 13]]
    assert flat["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3]]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_logits_equal_unpacked(tiny_model_dir, smol_tokenizer, tmp_path, attn):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation=attn).eval()
    examples, _ = build_examples(varied_jsonl(tmp_path / "d.jsonl", 12, lo=1, hi=12), smol_tokenizer, DataConfig())
    max_len = 160
    groups = pack_examples(examples, max_len)
    assert min(len(g) for g in groups[:2]) >= 2 and len(groups) >= 2
    rows = groups[:2]
    b = collate(examples, smol_tokenizer.pad_token_id, packed_groups=rows, max_length=max_len)
    with torch.no_grad():
        packed = model(**{k: v for k, v in b.items() if k != "labels"}, use_cache=False).logits   # (2, T, V)
        unpadded = collate([examples[i] for g in rows for i in g], smol_tokenizer.pad_token_id)
        single = model(**{k: v for k, v in unpadded.items() if k != "labels"}, use_cache=False).logits
    k = 0
    for r, g in enumerate(rows):
        off = 0
        for i in g:
            n = len(examples[i].input_ids)
            torch.testing.assert_close(packed[r, off:off + n], single[k, :n], atol=2e-5, rtol=1e-4)
            assert b["labels"][r, off:off + n].tolist() == [-100] + examples[i].labels[1:]
            off += n
            k += 1
    assert torch.isfinite(packed).all()                          # padding segments attend to themselves only


def test_truncation_policies(tmp_path, smol_tokenizer):
    long_answer = " ".join(["word"] * 80)
    rows = [{"messages": [{"role": "user", "content": "short"}, {"role": "assistant", "content": long_answer}]},
            {"messages": [{"role": "user", "content": " ".join(["q"] * 80)}, {"role": "assistant", "content": "a"}]},
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]}]
    f = tmp_path / "t.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ex_end, rep = build_examples(str(f), smol_tokenizer, DataConfig(max_length=40, truncation="end"))
    assert len(ex_end) == 2 and rep.truncated == 1 and len(ex_end[0].input_ids) == 40
    assert rep.dropped == {"no trainable tokens after truncation": 1}   # the long prompt ate every trained token
    assert all(any(lab != -100 for lab in e.labels) for e in ex_end)
    _, rep = build_examples(str(f), smol_tokenizer, DataConfig(max_length=40, truncation="drop"))
    assert rep.examples == 1 and rep.dropped == {"longer than max_length": 2}
    assert rep.rows_read == rep.examples + sum(rep.dropped.values())
    with pytest.raises(DataError, match=r"t.jsonl, line 1: the example has \d+ tokens, more than data.max_length 40"):
        build_examples(str(f), smol_tokenizer, DataConfig(max_length=40, truncation="error"))


def test_padding_stats_varied_lengths():
    rng = random.Random(0)
    lengths = [rng.randint(10, 500) for _ in range(400)]
    groups = pack_examples([ex(n) for n in lengths], 1024)
    st = padding_stats(lengths, 1024, batch_size=4, groups=groups)
    assert st["pad_fraction_packed"] < 0.02 < 0.3 < st["pad_fraction_unpacked"]
    assert st["pad_fraction_avoided"] == pytest.approx(st["pad_fraction_unpacked"] - st["pad_fraction_packed"])

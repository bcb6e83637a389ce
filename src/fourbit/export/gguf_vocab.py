"""The tokenizer of a transformers folder as GGUF metadata (`tokenizer.ggml.*`, `tokenizer.chat_template`).

Our own code because gguf-py's `SpecialVocab` only copies special ids and merges, and the vocab
builders live in llama.cpp's convert script, not in an installable package. Two kinds:

- byte-level BPE (SmolLM2, Llama 3, Qwen2): `tokenizer.ggml.model = gpt2`, tokens as spelled in
  tokenizer.json (byte alphabet), merges, and a pre-tokenizer name llama.cpp knows;
- SentencePiece (Llama 2, Mistral): `tokenizer.ggml.model = llama`, tokens with scores (merge
  priority: llama.cpp's SPM tokenizer merges the highest-scoring pair first) and token types.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Callable, Optional

import gguf

from ..errors import FourbitError
from .merge import end_of_turn_token

T = gguf.TokenType
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


@dataclass
class VocabInfo:
    model: str                     # "gpt2" or "llama"
    pre: Optional[str]
    size: int
    eos: Optional[int]
    eot: Optional[int]
    chat_template: Optional[str]


def _flat(node: Optional[dict]) -> list[dict]:
    if not node:
        return []
    if node.get("type") == "Sequence":
        return [p for child in node.get("pretokenizers", node.get("normalizers", [])) for p in _flat(child)]
    return [node]


def _pre_name(tj: dict, log: Callable[[str], None]) -> str:
    """llama.cpp's name for the regex that splits text before BPE (it has one per model family)."""
    parts = _flat(tj.get("pre_tokenizer"))
    kinds = [p.get("type") for p in parts]
    for p in parts:
        if p.get("type") == "Split":
            regex = (p.get("pattern") or {}).get("Regex")
            if regex == _LLAMA3_SPLIT:
                return "llama-bpe"
            if regex == _QWEN2_SPLIT:
                return "qwen2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and parts[1].get("use_regex", True):
        return "smollm"
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    log("note: unrecognised pre-tokenizer in tokenizer.json; writing `default` (llama.cpp may split text "
        "slightly differently from transformers)")
    return "default"


def _added(tj: dict) -> dict[int, dict]:
    return {a["id"]: a for a in tj.get("added_tokens", [])}


def _bpe_vocab(tj: dict, n: int) -> tuple[list[str], list[int], list[float]]:
    tokens, types = [f"[PAD{i}]" for i in range(n)], [T.UNUSED] * n
    for tok, i in tj["model"]["vocab"].items():
        tokens[i], types[i] = tok, T.NORMAL
    for i, a in _added(tj).items():
        tokens[i], types[i] = a["content"], (T.CONTROL if a.get("special") else T.USER_DEFINED)
    return tokens, types, [0.0] * n


def _merges(tj: dict) -> list[str]:
    return [m if isinstance(m, str) else " ".join(m) for m in tj["model"].get("merges", [])]


def _sp_vocab_from_json(tj: dict, n: int, unk: Optional[str]) -> tuple[list[str], list[int], list[float]]:
    """SentencePiece-style BPE stored in tokenizer.json: scores from merge order (earlier merge = higher)."""
    tokens, types, _ = _bpe_vocab(tj, n)
    rank = {}
    for k, m in enumerate(_merges(tj)):
        rank.setdefault(m.replace(" ", ""), k)
    scores = []
    for i, tok in enumerate(tokens):
        if types[i] == T.NORMAL and len(tok) == 6 and tok.startswith("<0x") and tok.endswith(">"):
            types[i] = T.BYTE
        elif tok == unk:
            types[i] = T.UNKNOWN
        scores.append(-float(rank[tok]) if tok in rank else (-1e4 - i if types[i] == T.NORMAL else 0.0))
    return tokens, types, scores


def _sp_vocab_from_model(path: str, tj: Optional[dict], n: int) -> tuple[list[str], list[int], list[float]]:
    try:
        import sentencepiece as spm
    except ImportError:
        from ..errors import FourbitError
        raise FourbitError(f"{path} is a SentencePiece model; reading it needs the `sentencepiece` package: "
                           "pip install sentencepiece") from None
    sp = spm.SentencePieceProcessor(model_file=path)
    tokens, types, scores = [f"[PAD{i}]" for i in range(n)], [T.UNUSED] * n, [-1000.0] * n
    for i in range(sp.vocab_size()):
        tokens[i], scores[i] = sp.id_to_piece(i), sp.get_score(i)
        types[i] = (T.UNKNOWN if sp.is_unknown(i) else T.CONTROL if sp.is_control(i) else
                    T.UNUSED if sp.is_unused(i) else T.BYTE if sp.is_byte(i) else T.NORMAL)
    for i, a in (_added(tj) if tj else {}).items():
        if i >= sp.vocab_size():
            tokens[i], types[i] = a["content"], (T.CONTROL if a.get("special") else T.USER_DEFINED)
    return tokens, types, scores


def add_tokenizer(writer: "gguf.GGUFWriter", model_dir: str, n_vocab: int,
                  log: Callable[[str], None] = print) -> VocabInfo:
    """Write vocab, merges or scores, token types, special ids and the chat template."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    tj = None
    if os.path.isfile(os.path.join(model_dir, "tokenizer.json")):
        with open(os.path.join(model_dir, "tokenizer.json"), encoding="utf-8") as f:
            tj = json.load(f)
    ids = list((tj or {}).get("model", {}).get("vocab", {}).values()) + list(_added(tj or {}))
    n = max([n_vocab, len(tok)] + [i + 1 for i in ids])
    if n > n_vocab:
        raise FourbitError(f"The tokenizer in `{model_dir}` has {n} tokens but the model's embedding has {n_vocab} "
                           "rows; resize the embeddings (model.resize_token_embeddings) before exporting.")
    sp_model = os.path.join(model_dir, "tokenizer.model")
    kind = (tj or {}).get("model", {}).get("type")
    decoders = [d.get("type") for d in _flat((tj or {}).get("decoder"))]
    pre = None
    if kind == "BPE" and "ByteLevel" in decoders:
        model, pre = "gpt2", _pre_name(tj, log)
        tokens, types, scores = _bpe_vocab(tj, n)
    elif os.path.isfile(sp_model):
        model = "llama"
        tokens, types, scores = _sp_vocab_from_model(sp_model, tj, n)
    elif kind == "BPE":
        model = "llama"
        tokens, types, scores = _sp_vocab_from_json(tj, n, tok.unk_token)
    else:
        raise FourbitError(f"The tokenizer in `{model_dir}` is `{kind or 'unknown'}`; fourbit's GGUF export writes "
                           "byte-level BPE and SentencePiece tokenizers. Use llama.cpp's convert_hf_to_gguf.py.")
    writer.add_tokenizer_model(model)
    if pre is not None:
        writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([int(t) for t in types])
    if model == "llama":
        writer.add_token_scores(scores)
        prefix = any(p.get("type") == "Metaspace" and p.get("prepend_scheme", "always") != "never"
                     for p in _flat((tj or {}).get("pre_tokenizer"))) or any(
            p.get("type") == "Prepend" for p in _flat((tj or {}).get("normalizer"))) or tj is None
        writer.add_add_space_prefix(prefix)
    if tj is not None and kind == "BPE":
        writer.add_token_merges(_merges(tj))

    with_special = tok("a", add_special_tokens=True)["input_ids"]
    plain = tok("a", add_special_tokens=False)["input_ids"]
    writer.add_add_bos_token(tok.bos_token_id is not None and len(with_special) > len(plain)
                             and with_special[0] == tok.bos_token_id)
    writer.add_add_eos_token(tok.eos_token_id is not None and len(with_special) > len(plain)
                             and with_special[-1] == tok.eos_token_id)
    for value, add in ((tok.bos_token_id, writer.add_bos_token_id), (tok.eos_token_id, writer.add_eos_token_id),
                       (tok.unk_token_id, writer.add_unk_token_id), (tok.pad_token_id, writer.add_pad_token_id)):
        if value is not None:
            add(int(value))
    eot_tok = end_of_turn_token(tok)
    eot = tok.convert_tokens_to_ids(eot_tok) if eot_tok else None
    if eot is not None:
        writer.add_eot_token_id(int(eot))
    template = tok.chat_template
    if isinstance(template, dict):
        template = template.get("default") or next(iter(template.values()))
    if template:
        writer.add_chat_template(template)
    return VocabInfo(model=model, pre=pre, size=n, eos=tok.eos_token_id, eot=eot, chat_template=template)

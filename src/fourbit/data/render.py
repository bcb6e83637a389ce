"""Render rows to token ids and decide, token by token, which ones are trained.

Why our own masking instead of `apply_chat_template(return_assistant_tokens_mask=True)`: that only
works for templates that wrap assistant text in `{% generation %}` markers, and almost no model's
template does. We find each assistant turn from the template itself: the text of the conversation
up to the turn *with the generation prompt* (what the model sees at inference) and the text *through*
the turn differ exactly by what the model must generate: the reply and its end-of-turn token
(`<|im_end|>`, `<|eot_id|>`, `</s>`, `<end_of_turn>`). Character spans are mapped to tokens with the
fast tokenizer's offsets, so the header (`<|im_start|>assistant\\n`) is never trained and the
end-of-turn token always is. Templates that rewrite earlier turns (Qwen3 drops old reasoning,
Mistral moves the system prompt) are handled by locating the turn's text in the full rendering.
"""
from __future__ import annotations

import os
from os.path import commonprefix
from typing import Optional

from ..errors import DataError
from .validate import RowProblem, Sample

IGNORE = -100

CHATML = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def get_chat_template(tokenizer, setting: Optional[str]) -> str:
    """The Jinja chat template to use: the tokenizer's own (setting None), built-in ChatML (`chatml`),
    a template file path, or a template string. Raises DataError when there is none."""
    if setting is None or setting == "":
        tmpl = getattr(tokenizer, "chat_template", None)
        if isinstance(tmpl, dict):                                  # named templates: use the default one
            tmpl = tmpl.get("default") or next(iter(tmpl.values()), None)
        if not tmpl:
            name = getattr(tokenizer, "name_or_path", "") or "this model"
            raise DataError(f"The tokenizer of {name} has no chat template, so chat rows (messages or alpaca) "
                            "cannot be rendered. Set data.chat_template: chatml to use the built-in ChatML "
                            "template, or set it to a .jinja file or a template string; or use "
                            "data.format: prompt_completion / text.")
        return tmpl
    if setting.lower() == "chatml":
        return CHATML
    if os.path.isfile(setting):
        with open(setting, encoding="utf-8") as f:
            return f.read()
    if "{{" in setting or "{%" in setting:
        return setting
    raise DataError(f"data.chat_template is {setting!r}: not `chatml`, not an existing file, and not a Jinja "
                    "template. Use chatml, a path to a .jinja file, or leave it unset for the tokenizer's own.")


def _render(tokenizer, template: str, messages: list[dict], gen: bool) -> str:
    if not messages:
        return ""
    try:
        return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                             add_generation_prompt=gen)
    except Exception as e:  # Jinja raise_exception or template bugs: report them against the row
        raise RowProblem("template error", f"the chat template failed on this row ({type(e).__name__}: {e})") \
            from None


def assistant_spans(tokenizer, template: str, messages: list[dict], last_turn_only: bool) -> tuple[str, list]:
    """The rendered conversation and the [start, end) character span of each trained assistant turn."""
    full = _render(tokenizer, template, messages, gen=False)
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if last_turn_only:
        turns = turns[-1:]
    spans, cursor = [], 0
    for n, i in enumerate(turns, 1):
        before = _render(tokenizer, template, messages[:i], gen=True)
        through = _render(tokenizer, template, messages[:i + 1], gen=False)
        if through.startswith(before):                  # the usual case: the reply follows the generation prompt
            head = len(before)
        else:                                           # e.g. the system prompt sits in the last user turn only:
            first = messages[i]["content"].lstrip()[:1]  # the reply starts where a different reply would differ
            other = dict(messages[i], content="Y" if first == "X" else "X")
            head = len(commonprefix([through, _render(tokenizer, template, messages[:i] + [other], gen=False)]))
        seg = through[head:]                            # the reply + end-of-turn (+ trailing separator)
        if full.startswith(through) and head >= cursor:
            start = head
        else:                                           # the template rewrote something: find the turn's text
            start = full.find(seg, cursor)
            if start < 0:
                content = messages[i]["content"].strip()
                k = seg.find(content)
                seg = seg[k:] if k >= 0 else seg
                start = full.find(seg, cursor) if k >= 0 else -1
            if start < 0:
                raise RowProblem("template rewrites turns",
                                 f"assistant message {i + 1} is rendered differently inside the whole conversation "
                                 "than as the last turn, so its tokens cannot be located; set "
                                 "data.last_turn_only: true to train only the final turn")
        end = start + len(seg)
        while end > start and full[end - 1].isspace():  # the separator after <|im_end|> is not generated
            end -= 1
        if end <= start:
            raise RowProblem("empty message", f"assistant message {i + 1} renders to no text")
        spans.append((start, end))
        cursor = end
    return full, spans


def _encode_with_spans(tokenizer, text: str, spans: list) -> tuple[list[int], list[bool]]:
    """Token ids of `text` and, per token, whether it starts inside one of `spans` (or straddles a span's
    start with only whitespace outside it)."""
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
    except (NotImplementedError, ValueError, TypeError):
        offsets = None
    if offsets is None:                                  # slow tokenizer: encode span by span
        ids, trained, pos = [], [], 0
        for s, e in spans + [(len(text), len(text))]:
            for a, b, flag in ((pos, s, False), (s, e, True)):
                if b > a:
                    piece = tokenizer(text[a:b], add_special_tokens=False)["input_ids"]
                    ids += piece
                    trained += [flag] * len(piece)
            pos = e
        return ids, trained
    ids = list(enc["input_ids"])
    trained, k = [], 0
    for (a, b) in offsets:
        while k < len(spans) and a >= spans[k][1]:
            k += 1
        if k == len(spans):
            trained.append(False)
            continue
        s = spans[k][0]
        # a token starting in the span is trained; so is one that only pulls leading whitespace into it
        # (SentencePiece's "▁Hello" when the reply starts after a space)
        trained.append(s <= a or (s < b and not text[a:s].strip()))
    return ids, trained


def encode(sample: Sample, tokenizer, template: Optional[str], train_on: str, last_turn_only: bool
           ) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one validated sample; labels are -100 where a token is not trained.

    Token 0 is never trained: nothing before it predicts it (and in a packed row, the token before it
    belongs to another example)."""
    if sample.kind == "messages":
        full, spans = assistant_spans(tokenizer, template, sample.messages, last_turn_only)
        ids, trained = _encode_with_spans(tokenizer, full, spans)
        if train_on == "all":
            trained = [True] * len(ids)
    else:
        prompt = tokenizer(sample.prompt, add_special_tokens=True)["input_ids"] if sample.prompt else []
        body = tokenizer(sample.completion, add_special_tokens=not prompt)["input_ids"]
        eos = tokenizer.eos_token_id
        if eos is not None and (not body or body[-1] != eos):
            body = body + [eos]
        ids = list(prompt) + list(body)
        train_prompt = train_on == "all" or sample.kind == "text"
        trained = [train_prompt] * len(prompt) + [True] * len(body)
    labels = [t if flag else IGNORE for t, flag in zip(ids, trained)]
    if labels:
        labels[0] = IGNORE
    return ids, labels


def template_notes(tokenizer, template: str) -> list[str]:
    """Warnings about a template that will train badly (e.g. an end-of-turn string that is not one token)."""
    probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
    try:
        full, spans = assistant_spans(tokenizer, template, probe, False)
        ids, trained = _encode_with_spans(tokenizer, full, spans)
    except RowProblem as e:
        return [f"the chat template fails on a minimal conversation: {e.message}"]
    last = [t for t, f in zip(ids, trained) if f][-1:]
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    special |= {i for i, tok in getattr(tokenizer, "added_tokens_decoder", {}).items() if getattr(tok, "special", True)}
    special.discard(getattr(tokenizer, "unk_token_id", None))
    if last and last[0] not in special:
        shown = tokenizer.decode(last)
        return [f"assistant turns end with {shown!r}, which is not a special token of this tokenizer; the model "
                "may not learn a clean stop (for ChatML, add <|im_start|>/<|im_end|> as special tokens)"]
    return []

"""Row formats: detect them and check every row, with one precise reason per bad row.

Chat templates fail late and vaguely on bad conversations (a Jinja `raise_exception`, or worse, a
silently wrong rendering), so we check the structure ourselves before rendering: field presence and
types, known roles, no empty turns, system first, alternating turns, a user turn before the first
assistant turn. Each check yields a short reason (used to count skipped rows) and a sentence naming
the field, so an error reads `data/train.jsonl, line 7: message 2 has role "assitant"; ...`.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Optional

from ..errors import DataError

ROLES = ("system", "user", "assistant", "tool")
FORMATS = ("messages", "alpaca", "prompt_completion", "text")
FIX = "Fix the row or set data.on_bad_row: skip."


class RowProblem(Exception):
    """A row that cannot be used: `reason` is the counting key, `message` the sentence for the user."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason, self.message = reason, message


@dataclass
class Sample:
    """A validated row in one of two shapes: a conversation, or plain prompt/completion text."""
    messages: Optional[list[dict]] = None      # messages and alpaca rows
    prompt: str = ""                           # prompt_completion rows (text rows: prompt "" and completion = text)
    completion: str = ""
    kind: str = "messages"                     # "messages" | "prompt_completion" | "text"


def detect_format(row: Any, where: str) -> str:
    """The format of a row from its fields (used on the first row when data.format is auto)."""
    keys = set(row) if isinstance(row, dict) else set()
    if "messages" in keys:
        return "messages"
    if "instruction" in keys and "output" in keys:
        return "alpaca"
    if "prompt" in keys and "completion" in keys:
        return "prompt_completion"
    if "text" in keys:
        return "text"
    found = ", ".join(sorted(map(str, keys))) if keys else f"a JSON {type(row).__name__}, not an object"
    raise DataError(f"{where}: cannot tell the data format from the fields ({found}). Rows need `messages` "
                    "(chat), `instruction`+`output` (alpaca), `prompt`+`completion`, or `text`; rename the "
                    "fields or set data.format.")


def _field(row: dict, name: str, fmt: str, optional: bool = False) -> str:
    if name not in row or row[name] is None:
        if optional:
            return ""
        raise RowProblem("missing field", f"field `{name}` is missing (format {fmt} needs it)")
    value = row[name]
    if not isinstance(value, str):
        raise RowProblem("wrong type", f"field `{name}` must be a string, got {type(value).__name__}")
    return value


def _check_messages(messages: Any) -> list[dict]:
    if not isinstance(messages, list):
        raise RowProblem("wrong type", f"field `messages` must be a list of {{role, content}} objects, "
                                       f"got {type(messages).__name__}")
    if not messages:
        raise RowProblem("empty conversation", "field `messages` is an empty list")
    seen_user = False
    prev = None
    for i, m in enumerate(messages, 1):
        if not isinstance(m, dict):
            raise RowProblem("wrong type", f"message {i} must be an object with role and content, "
                                           f"got {type(m).__name__}")
        for key in ("role", "content"):
            if key not in m or m[key] is None:
                raise RowProblem("missing field", f"message {i} has no `{key}`")
        role, content = m["role"], m["content"]
        if not isinstance(role, str):
            raise RowProblem("wrong type", f"message {i} has a {type(role).__name__} role; it must be a string")
        if not isinstance(content, str):
            raise RowProblem("wrong type", f"message {i} ({role}) has {type(content).__name__} content; "
                                           "it must be a string")
        if role not in ROLES:
            close = difflib.get_close_matches(role, ROLES, n=1)
            hint = f" (did you mean \"{close[0]}\"?)" if close else ""
            raise RowProblem("unknown role", f"message {i} has role \"{role}\"{hint}; roles must be system, user, "
                                             "assistant (or tool)")
        if not content.strip():
            raise RowProblem("empty message", f"message {i} ({role}) has empty content")
        if role == "system" and i != 1:
            raise RowProblem("system not first", f"message {i} is a system message; only the first message "
                                                 "may be a system message")
        if role == prev and role != "tool":
            raise RowProblem("consecutive turns", f"messages {i - 1} and {i} are both {role} turns; user and "
                                                  "assistant turns must alternate (merge them into one)")
        if role == "assistant" and not seen_user:
            raise RowProblem("assistant before user", f"message {i} is an assistant turn before any user turn")
        seen_user = seen_user or role == "user"
        prev = role
    if not any(m["role"] == "assistant" for m in messages):
        raise RowProblem("no assistant turn", "the conversation has no assistant turn, so nothing would be trained")
    return [dict(m) for m in messages]


def to_sample(row: Any, fmt: str) -> Sample:
    """Check one row of format `fmt` and normalise it; raises RowProblem."""
    if not isinstance(row, dict):
        raise RowProblem("wrong type", f"the row is a JSON {type(row).__name__}, not an object")
    if fmt == "messages":
        if "messages" not in row:
            raise RowProblem("missing field", "field `messages` is missing (format messages needs it)")
        return Sample(messages=_check_messages(row["messages"]))
    if fmt == "alpaca":
        instruction = _field(row, "instruction", fmt)
        extra = _field(row, "input", fmt, optional=True)
        output = _field(row, "output", fmt)
        system = _field(row, "system", fmt, optional=True)
        if not instruction.strip():
            raise RowProblem("empty message", "field `instruction` is empty")
        if not output.strip():
            raise RowProblem("empty message", "field `output` is empty")
        user = instruction if not extra.strip() else f"{instruction}\n\n{extra}"
        messages = ([{"role": "system", "content": system}] if system.strip() else []) + [
            {"role": "user", "content": user}, {"role": "assistant", "content": output}]
        return Sample(messages=messages)
    if fmt == "prompt_completion":
        prompt, completion = _field(row, "prompt", fmt), _field(row, "completion", fmt)
        if not completion.strip():
            raise RowProblem("empty message", "field `completion` is empty")
        return Sample(prompt=prompt, completion=completion, kind="prompt_completion")
    if fmt == "text":
        text = _field(row, "text", fmt)
        if not text.strip():
            raise RowProblem("empty message", "field `text` is empty")
        return Sample(completion=text, kind="text")
    raise ValueError(f"unknown format {fmt}")

"""`Example` and `DataReport`: what the data pipeline hands to the trainer, and the counts behind it.

Every row read ends up in exactly one bucket: kept, skipped (a bad row, by reason) or dropped (a
good row that cannot train, by reason), so `rows_read == examples + sum(skipped) + sum(dropped)`
holds and nothing disappears uncounted.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]        # same length as input_ids; label[t] = input_ids[t] when token t is trained, else -100


@dataclass
class DataReport:
    source: str = ""
    split: str = "train"
    format: str = ""
    template: str = ""                                     # "tokenizer's", "chatml", "custom", or "" (no chat rows)
    rows_read: int = 0
    examples: int = 0
    skipped: dict[str, int] = field(default_factory=dict)  # bad rows skipped (data.on_bad_row: skip), per reason
    dropped: dict[str, int] = field(default_factory=dict)  # good rows that cannot train, per reason
    truncated: int = 0                                     # kept examples cut to max_length
    tokens: int = 0
    trainable_tokens: int = 0
    max_length: int = 0
    lengths: list[int] = field(default_factory=list)       # token length of every kept example
    first_skipped: dict[str, str] = field(default_factory=dict)  # reason -> first message (to show the user)
    notes: list[str] = field(default_factory=list)
    from_cache: bool = False

    def count(self, bucket: str, reason: str, message: Optional[str] = None) -> None:
        d = getattr(self, bucket)
        d[reason] = d.get(reason, 0) + 1
        if message and bucket == "skipped":
            self.first_skipped.setdefault(reason, message)

    def length_stats(self) -> dict[str, float]:
        if not self.lengths:
            return {"min": 0, "median": 0, "p95": 0, "max": 0, "mean": 0.0}
        s = sorted(self.lengths)
        pick = lambda q: s[min(len(s) - 1, int(q * (len(s) - 1) + 0.5))]  # noqa: E731
        return {"min": s[0], "median": pick(0.5), "p95": pick(0.95), "max": s[-1], "mean": sum(s) / len(s)}

    def summary(self) -> str:
        """A few lines for the start of training."""
        st = self.length_stats()
        share = self.trainable_tokens / self.tokens if self.tokens else 0.0
        what = f"format {self.format}" + (f", template {self.template}" if self.template else "")
        lines = [f"data {self.split}: {self.source} ({what}): {self.rows_read:,} rows -> {self.examples:,} examples"
                 + (" (tokenized earlier, from cache)" if self.from_cache else "")]
        lines.append(f"  {self.tokens:,} tokens, {self.trainable_tokens:,} trained ({share:.1%}); length "
                     f"min/median/p95/max {st['min']}/{st['median']}/{st['p95']}/{st['max']} "
                     f"(max_length {self.max_length}); truncated {self.truncated:,}")
        for name, d in (("skipped bad rows", self.skipped), ("dropped", self.dropped)):
            if d:
                parts = ", ".join(f"{r}: {n:,}" for r, n in sorted(d.items(), key=lambda kv: -kv[1]))
                lines.append(f"  {name} {sum(d.values()):,} ({parts})")
        for reason, msg in self.first_skipped.items():
            lines.append(f"    e.g. {msg}")
        for note in self.notes:
            lines.append(f"  note: {note}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DataReport":
        return cls(**d)

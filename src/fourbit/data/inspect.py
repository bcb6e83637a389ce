"""`fourbit data inspect CONFIG`: what the trainer will see, before spending GPU time.

Prints the counts (rows, skipped and dropped per reason, truncated), a token-length histogram, the
share of trained tokens, what packing saves, and one example with its trained tokens marked:
green in a terminal, `[[like this]]` in plain text. `start_summary` is the short form for `fourbit train`.
"""
from __future__ import annotations

import os
import sys
from typing import Optional

from ..errors import DataError
from .build import build_examples
from .pack import pack_examples, padding_stats
from .report import DataReport, Example

GREEN, DIM, RESET = "\033[1;32m", "\033[2m", "\033[0m"


def render_example(tokenizer, example: Example, color: bool) -> str:
    """The example's text with trained tokens marked (runs of tokens decoded together)."""
    runs: list[tuple[bool, list[int]]] = []
    for t, lab in zip(example.input_ids, example.labels):
        trained = lab != -100
        if runs and runs[-1][0] == trained:
            runs[-1][1].append(t)
        else:
            runs.append((trained, [t]))
    out = []
    for trained, ids in runs:
        text = tokenizer.decode(ids, skip_special_tokens=False)
        if color:
            out.append(f"{GREEN if trained else DIM}{text}{RESET}")
        else:
            out.append(f"[[{text}]]" if trained else text)
    return "".join(out)


def length_histogram(lengths: list[int], max_length: int, bins: int = 10, width: int = 40) -> str:
    """A text histogram of token lengths over [0, max_length]."""
    if not lengths:
        return "  (no examples)"
    step = max(1, -(-max_length // bins))
    counts = [0] * bins
    for n in lengths:
        counts[min(bins - 1, (n - 1) // step if n > 0 else 0)] += 1
    top = max(counts)
    lines = []
    for b, c in enumerate(counts):
        lo, hi = b * step + 1, min(max_length, (b + 1) * step)
        bar = "#" * (round(width * c / top) if top else 0)
        lines.append(f"  {lo:>6}-{hi:<6} {c:>8,} {bar}")
    return "\n".join(lines)


def start_summary(report: DataReport, eval_report: Optional[DataReport] = None,
                  packing: Optional[dict] = None) -> str:
    """The few lines `fourbit train` prints before the first step."""
    parts = [report.summary()]
    if eval_report is not None:
        parts.append(eval_report.summary())
    if packing:
        parts.append(f"  packing: {packing['rows_unpacked']:,} examples in {packing['rows_packed']:,} rows; padding "
                     f"{packing['pad_fraction_unpacked']:.1%} unpacked -> {packing['pad_fraction_packed']:.1%} packed")
    return "\n".join(parts)


def _use_color(mode: str) -> bool:
    if mode == "always":
        return True
    if mode == "never":
        return False
    return sys.stdout.isatty() and not os.environ.get("NO_COLOR")


def inspect_cmd(cfg, args) -> int:
    """Entry point of `fourbit data inspect` (args: .split, .index, .color)."""
    from transformers import AutoTokenizer
    split = getattr(args, "split", "train")
    source = cfg.data.train if split == "train" else cfg.data.eval
    if not source:
        raise DataError(f"Config key `data.{split}` is not set, so there is no {split} data to inspect.")
    tokenizer = AutoTokenizer.from_pretrained(cfg.model, trust_remote_code=cfg.trust_remote_code)
    examples, report = build_examples(source, tokenizer, cfg.data, split=split)
    color = _use_color(getattr(args, "color", "auto"))
    print(report.summary())
    print(f"\ntoken lengths (max_length {cfg.data.max_length}):")
    print(length_histogram(report.lengths, cfg.data.max_length))
    share = report.trainable_tokens / report.tokens if report.tokens else 0.0
    print(f"\ntrained tokens: {report.trainable_tokens:,} of {report.tokens:,} ({share:.1%}; train_on "
          f"{cfg.data.train_on}{', last turn only' if cfg.data.last_turn_only else ''})")
    print(f"truncated: {report.truncated:,} (data.truncation: {cfg.data.truncation}); dropped: "
          f"{sum(report.dropped.values()):,}; skipped bad rows: {sum(report.skipped.values()):,}")
    groups = pack_examples(examples, cfg.data.max_length)
    st = padding_stats(report.lengths, cfg.data.max_length, cfg.train.micro_batch_size, groups, seed=cfg.train.seed)
    state = "on" if cfg.data.packing else "off (data.packing: true to enable)"
    print(f"padding at micro_batch_size {cfg.train.micro_batch_size}: {st['pad_fraction_unpacked']:.1%} of token "
          f"slots unpacked; packed {st['rows_unpacked']:,} examples into {st['rows_packed']:,} rows with "
          f"{st['pad_fraction_packed']:.1%} padding ({1 - st['slots_saved']:.0%} of the unpacked token slots). "
          f"Packing is {state}.")
    index = getattr(args, "index", 0)
    if not 0 <= index < len(examples):
        raise DataError(f"--index {index} is out of range: the {split} data has {len(examples)} examples.")
    legend = (f"{GREEN}trained{RESET} / {DIM}not trained{RESET}" if color else "[[trained]] / not trained")
    ex = examples[index]
    n_train = sum(lab != -100 for lab in ex.labels)
    print(f"\nexample {index} ({len(ex.input_ids)} tokens, {n_train} trained; {legend}):")
    print(render_example(tokenizer, ex, color))
    return 0

"""fourbit's data pipeline: read, validate, render with the chat template, mask, truncate, pack, collate.

    examples, report = build_examples("data/train.jsonl", tokenizer, cfg.data)
    groups = pack_examples(examples, cfg.data.max_length)        # when data.packing
    batch = collate(examples, tokenizer.pad_token_id, packed_groups=groups[:2])

Modules: sources (files and hub rows with locations), validate (formats and row checks), render
(chat templates and assistant masks), build (build_examples, counts, cache, workers), pack (packing
and collate), report (Example, DataReport), inspect (`fourbit data inspect`).
"""
from .build import build_examples, cache_dir
from .pack import collate, pack_examples, padding_stats
from .render import CHATML, get_chat_template
from .report import DataReport, Example

__all__ = ["Example", "DataReport", "get_chat_template", "build_examples", "pack_examples", "collate",
           "padding_stats", "cache_dir", "CHATML"]

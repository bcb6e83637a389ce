"""How far a merged model drifts from what was trained: the 4-bit base + adapter.

Both models see the same held-out batches; we report the mean next-token KL(trained || merged)
over real (non-padding) positions and the eval loss of each. The reference model is built in
`_reference_logits` only -- today with peft + bitsandbytes (peft is optional at run time: without
it drift is skipped with a note), later with fourbit's own loader. Keep that seam small.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional

import torch
import torch.nn.functional as F

from ..errors import DataError
from .adapter import Adapter


@dataclass
class Drift:
    kl: float            # mean next-token KL(reference || merged), nats
    loss_reference: float
    loss_merged: float
    tokens: int
    batches: int


def read_texts(path: str, tokenizer, limit: int = 16) -> list[tuple[str, str]]:
    """The first `limit` rows of a .jsonl/.json file as (full text, unscored prefix).

    Chat rows are rendered with the chat template; the prefix is everything before the last assistant
    turn, so the score covers what the model was trained to write (as fourbit's training loss does).
    """
    if not os.path.isfile(path):
        raise DataError(f"Eval data `{path}` not found. Pass a .jsonl file with --eval-data.")
    with open(path, encoding="utf-8") as f:
        if path.endswith(".json"):
            rows = json.load(f)
            rows = rows if isinstance(rows, list) else [rows]
        else:
            rows = []
            for i, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise DataError(f"{path}, row {i}: not valid JSON ({e.msg}).") from None
                if len(rows) >= limit:
                    break
    texts = []
    for i, row in enumerate(rows[:limit], 1):
        if not isinstance(row, dict):
            raise DataError(f"{path}, row {i}: expected a JSON object, got {type(row).__name__}.")
        if "messages" in row:
            msgs = row["messages"]
            last = max((j for j, m in enumerate(msgs) if m.get("role") == "assistant"), default=None)
            prefix = ("" if last is None else
                      tokenizer.apply_chat_template(msgs[:last], tokenize=False, add_generation_prompt=True))
            texts.append((tokenizer.apply_chat_template(msgs, tokenize=False), prefix))
        elif "text" in row:
            texts.append((str(row["text"]), ""))
        elif "prompt" in row and "completion" in row:
            texts.append((str(row["prompt"]) + str(row["completion"]), str(row["prompt"])))
        elif "instruction" in row and "output" in row:
            prompt = f"{row['instruction']}\n{row.get('input') or ''}\n"
            texts.append((prompt + str(row["output"]), prompt))
        else:
            raise DataError(f"{path}, row {i}: no `messages`, `text`, `prompt`/`completion` or "
                            f"`instruction`/`output` field (fields: {', '.join(map(str, row))}).")
    return texts


def make_batches(tokenizer, texts: list[tuple[str, str]], batch_size: int = 4,
                 max_length: int = 256) -> list[tuple[dict, torch.Tensor]]:
    """(model inputs, scored mask (B, T): 1 where the token is one the model should predict)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batches = []
    for i in range(0, len(texts), batch_size):
        rows = texts[i:i + batch_size]
        enc = [tokenizer(t, add_special_tokens=False)["input_ids"][:max_length] for t, _ in rows]
        n_prefix = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) if p else 1 for _, p in rows]
        T = max(len(e) for e in enc)
        ids = torch.full((len(enc), T), pad, dtype=torch.long)   # (B, T)
        mask = torch.zeros((len(enc), T), dtype=torch.long)      # (B, T), 1 = real token
        score = torch.zeros((len(enc), T), dtype=torch.bool)     # (B, T), 1 = scored target
        for j, e in enumerate(enc):
            ids[j, :len(e)] = torch.tensor(e)
            mask[j, :len(e)] = 1
            score[j, n_prefix[j]:len(e)] = True
        batches.append(({"input_ids": ids, "attention_mask": mask}, score))
    return batches


def _reference_logits(base_dir: str, adapter_dir: str, quant: dict, batches: Iterable[dict]) -> Iterator[torch.Tensor]:
    """Logits (B, T, V) float32 of the model as trained: base in 4-bit (NF4) + the LoRA adapter.

    Today: transformers + bitsandbytes + peft. The lead will switch this to fourbit.model / fourbit.lora.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    compute = getattr(torch, str(quant.get("compute_dtype", "bfloat16")))
    kwargs = {}
    if quant.get("bits") == 4:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=quant.get("type", "nf4"),
            bnb_4bit_use_double_quant=bool(quant.get("double_quant", True)), bnb_4bit_compute_dtype=compute)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=compute, **kwargs)
    model = PeftModel.from_pretrained(model, adapter_dir).eval()
    with torch.no_grad():
        for b in batches:
            yield model(**b).logits.float()


def _shifted(logits: torch.Tensor, batch: dict, score: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token log-probs (N, V) and targets (N,) at the scored positions only."""
    valid = score[:, 1:]                                                    # (B, T-1): target t+1 is scored
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)[valid]             # (N, V)
    return logp, batch["input_ids"][:, 1:][valid]


def measure_drift(adapter: Adapter, merged_dir: str, batches: list[tuple[dict, torch.Tensor]],
                  dtype: str = "bfloat16") -> Drift:
    """Mean next-token KL(4-bit + adapter || merged) and both eval losses over the scored tokens of `batches`."""
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=getattr(torch, dtype)).eval()
    kl_sum, ref_nll, mer_nll, n = 0.0, 0.0, 0.0, 0
    with torch.no_grad():
        inputs = [b for b, _ in batches]
        for ref_logits, (b, score) in zip(_reference_logits(adapter.base_dir, adapter.dir, adapter.quant, inputs),
                                          batches):
            ref_lp, target = _shifted(ref_logits, b, score)
            mer_lp, _ = _shifted(merged(**b).logits, b, score)
            kl_sum += (ref_lp.exp() * (ref_lp - mer_lp)).sum().item()
            ref_nll -= ref_lp.gather(1, target[:, None]).sum().item()
            mer_nll -= mer_lp.gather(1, target[:, None]).sum().item()
            n += target.numel()
    n = max(n, 1)
    return Drift(kl=kl_sum / n, loss_reference=ref_nll / n, loss_merged=mer_nll / n, tokens=n, batches=len(batches))


def drift_report(adapter: Adapter, merged_dir: str, eval_data: Optional[str], dtype: str = "bfloat16",
                 max_rows: int = 16) -> Optional[Drift]:
    """Print the drift line for `fourbit merge` (or a note saying why it was skipped)."""
    import importlib.util

    from transformers import AutoTokenizer

    path = eval_data or (adapter.run_config.get("data") or {}).get("eval")
    if not path:
        print("drift: skipped (no held-out data; pass --eval-data FILE.jsonl or set data.eval in the run config)")
        return None
    if not eval_data and not (os.path.isfile(path) and path.endswith((".jsonl", ".json"))):
        print(f"drift: skipped (the run's data.eval `{path}` is not a local .jsonl/.json file; pass --eval-data)")
        return None
    if importlib.util.find_spec("peft") is None:
        print("drift: skipped (needs `peft` to build the 4-bit base + adapter reference: pip install peft)")
        return None
    tok = AutoTokenizer.from_pretrained(merged_dir)
    batches = make_batches(tok, read_texts(path, tok, max_rows))
    d = measure_drift(adapter, merged_dir, batches, dtype=dtype)
    print(f"drift vs 4-bit base + adapter on {d.tokens} held-out answer tokens ({d.batches} batches of {path}): "
          f"mean next-token KL {d.kl:.2e} nats; eval loss {d.loss_reference:.4f} (4-bit + adapter) -> "
          f"{d.loss_merged:.4f} (merged), diff {d.loss_merged - d.loss_reference:+.4f}")
    return d

"""`fourbit train` end to end on whatever device is there (the GPU machine has no hub and no demo model).

Builds a random Llama with a word-level tokenizer in a temp folder, writes a small memorisable text
dataset of varied lengths, and runs the real CLI: 4-bit NF4, packing, the checkpointing policy given,
paged AdamW 32-bit. Then `fourbit plan` on the same config. Prints the metrics and a verdict line.

    python benchmarks/gpu_smoke.py [--policy offload] [--device cuda]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile


def build(root: str, hidden: int, layers: int, vocab: int) -> str:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    words = {f"t{i}": i for i in range(vocab)}
    raw = Tokenizer(models.WordLevel(words, unk_token="t0"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="t0", eos_token="t1", pad_token="t2", bos_token="t3")
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 3, num_hidden_layers=layers,
                      num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 256),
                      initializer_range=0.2, bos_token_id=3, eos_token_id=1, pad_token_id=2)
    torch.manual_seed(0)
    model_dir = os.path.join(root, "model")
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    rng = random.Random(0)
    texts = [" ".join(f"t{rng.randrange(4, vocab)}" for _ in range(rng.randrange(20, 200))) for _ in range(12)]
    with open(os.path.join(root, "train.jsonl"), "w") as f:
        for i in range(96):
            f.write(json.dumps({"text": texts[i % len(texts)]}) + "\n")
    return model_dir


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--policy", default="offload")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=40)
    a = ap.parse_args()
    root = tempfile.mkdtemp(prefix="fourbit-smoke-")
    model_dir = build(root, a.hidden, a.layers, 4096)
    cfg = os.path.join(root, "cfg.yaml")
    with open(cfg, "w") as f:
        f.write(f"model: {model_dir}\noutput: {root}/run\n"
                f"lora: {{r: 16, alpha: 32, dropout: 0.05}}\n"
                f"data: {{train: {root}/train.jsonl, max_length: 512, packing: true}}\n"
                f"train: {{lr: 1.0e-2, max_steps: {a.steps}, micro_batch_size: 2, grad_accum: 2, log_every: 10, "
                f"save_every: 20, device: {a.device}, grad_checkpointing: true, checkpointing_policy: {a.policy}}}\n")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    r = subprocess.run([sys.executable, "-m", "fourbit", "train", cfg], env=env, capture_output=True, text=True)
    print(r.stdout[-3000:], r.stderr[-3000:] if r.returncode else "")
    recs = [json.loads(x) for x in open(os.path.join(root, "run", "metrics.jsonl")) if '"loss"' in x] \
        if r.returncode == 0 else []
    p = subprocess.run([sys.executable, "-m", "fourbit", "plan", cfg], env=env, capture_output=True, text=True)
    print(p.stdout[-2500:], p.stderr[-1000:])
    ok = r.returncode == 0 and len(recs) >= 2 and recs[-1]["loss"] < 0.5 * recs[0]["loss"] and \
        os.path.isfile(os.path.join(root, "run", "adapter", "adapter_model.safetensors"))
    print("SMOKE " + json.dumps({"ok": ok, "rc": r.returncode, "losses": [x["loss"] for x in recs],
                                 "tokens_per_s": [x["tokens_per_s"] for x in recs]}))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

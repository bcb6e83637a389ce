"""CPU training throughput: fourbit vs the classic peft + bitsandbytes recipe, side by side.

SmolLM2-135M-Instruct (the demo model), seq 256 x batch 4, LoRA r=16 alpha=32 on all linear layers,
AdamW (fourbit: its trainer's CPU path, one flat adapter buffer and torch's fused AdamW; peft: torch's
AdamW as HF's Trainer uses it), random token ids (all trainable). Each variant runs in its own subprocess (clean memory,
same threads) for `--steps` optimizer steps; tokens/s is the best of the steps after the first
(as in shared/ANCHORS.md). Prints a table and one `RESULT {json}` line.

    python benchmarks/cpu_train.py                       # all variants
    python benchmarks/cpu_train.py --variants fourbit-nf4,peft-nf4 --ckpt 0
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

VARIANTS = ("fourbit-nf4", "fourbit-bf16", "peft-nf4", "peft-bf16")


def run_variant(name: str, seq: int, bsz: int, steps: int, ckpt: bool, dropout: float, model_dir: str,
                policy: str = "full") -> dict:
    import torch
    torch.manual_seed(0)
    quant = name.endswith("nf4")
    ids = torch.randint(3, 49152, (bsz, seq), generator=torch.Generator().manual_seed(1))
    if name.startswith("fourbit"):
        from fourbit.config import LoraConfig, QuantConfig
        from fourbit.lora import FlatLoRA, apply_lora
        from fourbit.model import load_base
        from fourbit.train.activations import apply_checkpointing
        from fourbit.train.loss import causal_lm_loss
        model = load_base(model_dir, QuantConfig(bits=4 if quant else None), torch.device("cpu"))
        apply_lora(model, LoraConfig(r=16, alpha=32, dropout=dropout))
        apply_checkpointing(model, policy if ckpt else "off", fuse=False)   # as `fourbit train` on CPU
        model.train()
        flat = FlatLoRA(model)                        # as `fourbit train`: one buffer, fused AdamW
        params = [flat.flat]
        batch = {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}

        def loss_fn():
            s, n = causal_lm_loss(model, batch)
            return s / n

        def before_step():
            flat.gather_grads()
    else:
        from peft import LoraConfig as PeftLora, get_peft_model, prepare_model_for_kbit_training
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig
        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=bnb if quant else None,
                                                     dtype=torch.bfloat16, device_map={"": "cpu"})
        model.config.use_cache = False
        if quant:
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=ckpt)
        elif ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        model = get_peft_model(model, PeftLora(r=16, lora_alpha=32, lora_dropout=dropout, task_type="CAUSAL_LM",
                                               target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                               "up_proj", "down_proj"]))
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]

        def loss_fn():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return model(input_ids=ids, labels=ids).loss

        def before_step():
            pass
    fused = name.startswith("fourbit")                # what each stack's trainer uses on CPU by default
    opt = torch.optim.AdamW(params, lr=1e-4, fused=fused)
    times, losses = [], []
    for _ in range(steps):
        t = time.perf_counter()
        loss = loss_fn()
        loss.backward()
        before_step()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if name.startswith("fourbit"):
            flat.zero_grad()
        times.append(time.perf_counter() - t)
        losses.append(round(float(loss), 4))
    best = min(times[1:]) if len(times) > 1 else times[0]
    return {"variant": name, "tokens_per_s": round(seq * bsz / best, 1), "s_per_step": [round(t, 2) for t in times],
            "losses": losses, "threads": torch.get_num_threads()}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--bsz", type=int, default=4)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--ckpt", type=int, default=1)
    p.add_argument("--policy", default="full", help="fourbit's checkpointing policy when --ckpt 1 (full | selective)")
    p.add_argument("--dropout", type=float, default=0.05)
    p.add_argument("--model", default=None, help="model folder (default: the demo SmolLM2-135M-Instruct)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        res = run_variant(a.child, a.seq, a.bsz, a.steps, bool(a.ckpt), a.dropout, a.model, a.policy)
        print("CHILD " + json.dumps(res), flush=True)
        return
    if a.model is None:
        from fourbit.demo import prepare_demo_model
        a.model = prepare_demo_model()
    rows = []
    for v in a.variants.split(","):
        cmd = [sys.executable, __file__, "--child", v, "--seq", str(a.seq), "--bsz", str(a.bsz), "--steps",
               str(a.steps), "--ckpt", str(a.ckpt), "--dropout", str(a.dropout), "--model", a.model,
               "--policy", a.policy]
        out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        line = [ln for ln in out.stdout.splitlines() if ln.startswith("CHILD ")]
        if not line:
            print(out.stderr[-2000:], file=sys.stderr)
            raise SystemExit(f"variant {v} failed")
        rows.append(json.loads(line[0][6:]))
        print(f"{v:14s} {rows[-1]['tokens_per_s']:8.1f} tokens/s  steps {rows[-1]['s_per_step']}  "
              f"losses {rows[-1]['losses']}", flush=True)
    base = {r["variant"]: r["tokens_per_s"] for r in rows}
    if "fourbit-nf4" in base and "peft-nf4" in base:
        print(f"fourbit-nf4 / peft-nf4 = {base['fourbit-nf4'] / base['peft-nf4']:.2f}x")
    print("RESULT " + json.dumps({"date": time.strftime("%Y-%m-%d"), "seq": a.seq, "bsz": a.bsz, "ckpt": a.ckpt,
                                  "dropout": a.dropout, "rows": rows}))


if __name__ == "__main__":
    main()

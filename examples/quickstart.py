"""The quickstart: fine-tune SmolLM2-135M-Instruct on facts about a fictional observatory, on a CPU.

Prints the base model's and the fine-tuned model's answers to held-out questions (with a keyword
check) and the held-out loss before and after. Run from the repository root:

    python examples/quickstart.py [--section.key=value ...]     # overrides go to the training config
"""
from __future__ import annotations

import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def ask_all(model, tok, questions):
    from fourbit.infer import generate_reply
    return [generate_reply(model, tok, [{"role": "user", "content": q["question"]}], max_new_tokens=48)
            for q in questions]


def hit(answer: str, expect: list[str]) -> bool:
    return any(k.lower() in answer.lower() for k in expect)


def gguf_answers(run_dir: str, questions: list[dict]) -> None:
    """Merge the run, export q8_0 GGUF, read it back with transformers' GGUF reader and ask it."""
    import shutil

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fourbit.export.gguf import export_gguf
    from fourbit.export.merge import merge_adapter
    from fourbit.infer import generate_reply
    merged = os.path.join(run_dir, "merged")
    shutil.rmtree(merged, ignore_errors=True)
    merge_adapter(run_dir, merged)
    gguf_file = os.path.join(run_dir, "model.q8_0.gguf")
    res = export_gguf(merged, gguf_file, "q8_0")
    print(f"wrote {res.path} ({res.bytes / 1e6:.0f} MB)", flush=True)
    folder, name = os.path.split(os.path.abspath(gguf_file))
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype="float32").eval()
    for q in questions:
        a = generate_reply(model, tok, [{"role": "user", "content": q["question"]}], max_new_tokens=48)
        print(f"Q: {q['question']}\n  gguf : [{'x' if hit(a, q['expect']) else ' '}] {a}")
    print(f"chat template in the GGUF: {'yes' if tok.chat_template else 'no'}; "
          f"run it with llama.cpp: llama-cli -m {gguf_file} -cnv")


def main(argv: list[str]) -> int:
    from fourbit.config import load_config
    from fourbit.data import build_examples
    from fourbit.demo import prepare_demo_model
    from fourbit.infer import heldout_loss, load_for_inference
    from fourbit.train.loop import run_training

    t0 = time.time()
    os.chdir(os.path.dirname(HERE))
    model_dir = prepare_demo_model()
    cfg = load_config(os.path.join(HERE, "quickstart.yaml"), [f"--model={model_dir}", *argv])
    questions = [json.loads(line) for line in open(os.path.join(HERE, "data", "questions.jsonl"), encoding="utf-8")]

    print(f"== base model: {model_dir}", flush=True)
    base, tok = load_for_inference(model_dir, quant="4" if cfg.quant.bits else "none")
    eval_examples, _ = build_examples(cfg.data.eval, tok, cfg.data, split="eval")
    loss_before = heldout_loss(base, tok, eval_examples)
    answers_before = ask_all(base, tok, questions)
    del base

    print(f"== fine-tuning ({cfg.output})", flush=True)
    run_training(cfg)

    tuned, tok = load_for_inference(cfg.output)
    loss_after = heldout_loss(tuned, tok, eval_examples)
    answers_after = ask_all(tuned, tok, questions)

    print("\n== held-out questions (base -> fine-tuned)")
    for q, a, b in zip(questions, answers_before, answers_after):
        print(f"\nQ: {q['question']}\n  base : [{'x' if hit(a, q['expect']) else ' '}] {a}\n"
              f"  tuned: [{'x' if hit(b, q['expect']) else ' '}] {b}")
    hb = sum(hit(a, q["expect"]) for q, a in zip(questions, answers_before))
    ha = sum(hit(b, q["expect"]) for q, b in zip(questions, answers_after))
    print(f"\ncorrect answers: base {hb}/{len(questions)}, fine-tuned {ha}/{len(questions)}")
    print(f"held-out loss:   base {loss_before:.3f}, fine-tuned {loss_after:.3f}")
    print(f"adapter: {cfg.output}/adapter  (chat with it: fourbit chat --model {cfg.output})")
    del tuned

    print("\n== deployable model: merge into 16-bit, export GGUF, answer from the GGUF file", flush=True)
    gguf_answers(cfg.output, questions[:4])
    print(f"total time {time.time() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    from fourbit.cli import run_guarded
    raise SystemExit(run_guarded(main, sys.argv[1:]))

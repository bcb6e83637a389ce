"""The `fourbit` command line: one typed function per command.

User errors (`FourbitError`) print one paragraph and exit 2; `--debug` shows the traceback.
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback

from .errors import FourbitError


def _train(a: argparse.Namespace, extra: list[str]) -> int:
    from .config import load_config
    from .train.loop import run_training
    cfg = load_config(a.config, extra)
    run_training(cfg, resume=a.resume, force=a.force)
    return 0


def _generate(a: argparse.Namespace, extra: list[str]) -> int:
    from .infer import generate_cmd
    _no_extra(extra)
    return generate_cmd(a)


def _chat(a: argparse.Namespace, extra: list[str]) -> int:
    from .infer import chat_cmd
    _no_extra(extra)
    return chat_cmd(a)


def _merge(a: argparse.Namespace, extra: list[str]) -> int:
    from .export.merge import merge_cmd
    _no_extra(extra)
    return merge_cmd(a)


def _export(a: argparse.Namespace, extra: list[str]) -> int:
    from .export.gguf import export_cmd
    _no_extra(extra)
    return export_cmd(a)


def _data(a: argparse.Namespace, extra: list[str]) -> int:
    from .config import load_config
    from .data.inspect import inspect_cmd
    cfg = load_config(a.config, extra)
    return inspect_cmd(cfg, a)


def _plan(a: argparse.Namespace, extra: list[str]) -> int:
    from .config import load_config
    from .plan import plan_cmd
    cfg = load_config(a.config, extra)
    return plan_cmd(cfg, a)


def _bench(a: argparse.Namespace, extra: list[str]) -> int:
    from .bench import bench_cmd
    return bench_cmd(a, extra)


def _no_extra(extra: list[str]) -> None:
    if extra:
        raise FourbitError(f"Unexpected arguments: {' '.join(extra)}. Run the command with --help to see its options.")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fourbit", description="QLoRA fine-tuning: train, chat, merge, export.")
    p.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="fine-tune a model from a YAML config (+ --section.key=value overrides)")
    t.add_argument("config", help="YAML config file")
    t.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in the run folder")
    t.add_argument("--force", action="store_true", help="run even if the memory plan or a resume check says no")
    t.set_defaults(fn=_train)

    for name, fn, helptext in (("generate", _generate, "generate a reply to one prompt"),
                               ("chat", _chat, "interactive chat in the terminal")):
        g = sub.add_parser(name, help=helptext)
        g.add_argument("--model", required=True, help="base model (hub id or folder), a merged model, or a run folder")
        g.add_argument("--adapter", help="LoRA adapter folder (fourbit or PEFT)")
        g.add_argument("--system", help="system prompt")
        g.add_argument("--max-new-tokens", type=int, default=256)
        g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
        g.add_argument("--top-p", type=float, default=1.0)
        g.add_argument("--quant", choices=["auto", "4", "none"], default="auto",
                       help="base weights: as the adapter was trained (auto), 4-bit NF4, or 16-bit")
        g.add_argument("--device", default="auto")
        g.add_argument("--chat-template", help="`chatml` or a template file, for models without one")
        g.add_argument("--trust-remote-code", action="store_true")
        if name == "generate":
            g.add_argument("--prompt", required=True, help="the user message")
            g.add_argument("--raw", action="store_true", help="no chat template: continue the prompt text")
        g.set_defaults(fn=fn)

    m = sub.add_parser("merge", help="merge a LoRA adapter into a 16-bit model folder")
    m.add_argument("source", help="run folder or adapter folder")
    m.add_argument("--out", required=True, help="output folder")
    m.add_argument("--base", choices=["original", "dequantized"], default=None,
                   help="merge into the original 16-bit weights or the NF4-dequantized ones the adapter was trained on")
    m.add_argument("--model", help="base model, when the adapter does not name one that can be found")
    m.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    m.add_argument("--max-shard-size", default="2GB")
    m.add_argument("--eval-data", help="held-out data to measure the merged model's drift on")
    m.set_defaults(fn=_merge)

    e = sub.add_parser("export", help="export a model to another format")
    esub = e.add_subparsers(dest="format", required=True)
    eg = esub.add_parser("gguf", help="write a GGUF file for llama.cpp")
    eg.add_argument("source", help="merged model folder, or a run folder (merged first)")
    eg.add_argument("--type", choices=["f16", "bf16", "q8_0"], default="bf16")
    eg.add_argument("--out", help="output .gguf file")
    eg.add_argument("--adapter-only", action="store_true", help="write a GGUF LoRA adapter instead of a whole model")
    eg.add_argument("--model", help="base model of a run/adapter source, when its config does not name one that can be found")
    eg.set_defaults(fn=_export)

    d = sub.add_parser("data", help="data tools")
    dsub = d.add_subparsers(dest="data_command", required=True)
    di = dsub.add_parser("inspect", help="lengths, masks, truncation and one rendered example")
    di.add_argument("config")
    di.add_argument("--split", choices=["train", "eval"], default="train")
    di.add_argument("--index", type=int, default=0, help="which example to render")
    di.add_argument("--color", choices=["auto", "always", "never"], default="auto")
    di.set_defaults(fn=_data)

    pl = sub.add_parser("plan", help="predict peak memory before loading anything")
    pl.add_argument("config")
    pl.add_argument("--memory", help="memory budget such as 24GiB (default: the detected device)")
    pl.set_defaults(fn=_plan)

    b = sub.add_parser("bench", help="training throughput of a named model shape (random weights, no download)",
                       add_help=False)
    b.set_defaults(fn=_bench)
    return p


def run_guarded(fn, *args, debug: bool = False) -> int:
    """Call fn(*args); a FourbitError becomes one paragraph on stderr and exit status 2."""
    debug = debug or os.environ.get("FOURBIT_DEBUG") == "1"
    try:
        return fn(*args)
    except FourbitError as e:
        if debug:
            traceback.print_exc()
        print(f"fourbit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fourbit: interrupted", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    return run_guarded(args.fn, args, extra, debug=args.debug)


if __name__ == "__main__":
    raise SystemExit(main())

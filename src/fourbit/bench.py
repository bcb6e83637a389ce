"""`fourbit bench`: training throughput of a named model shape, fourbit beside the classic stack.

A random model of a named shape (fourbit.shapes, no download) is trained for `warm` + `steps`
optimizer steps on random token ids (all tokens trainable) through fourbit's own training code:
LoRALinear (`apply_lora`), `causal_lm_loss`, the checkpointing policy (`train.activations`),
bitsandbytes' paged AdamW 32-bit with clipping as in `train.loop`. The classic stack (transformers
+ bitsandbytes Linear4bit + peft + HF gradient checkpointing, the model's own loss under bf16
autocast, as trl's SFTTrainer runs it) is run on the SAME weights, ids and order, so losses compare
step by step. Rows are those of the shared seed_stack.py: Generator().manual_seed(1), randint(3, V).

The schedule mirrors seed_stack's SFTConfig (lr 2e-4, warmup ceil(0.03 * total) steps starting at
lr 0, cosine, weight decay 0.001, max_grad_norm 0.3) for both stacks.

`run_steps(...)` returns a dict (tokens_per_s, peak_alloc, peak_reserved, loss, mfu, ...); memory
planning reuses it with `build_random_model` for calibration.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import time
from typing import Optional

import torch

from .shapes import SHAPES, build_random_model, flops_per_token
from .switches import Switches

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GIB = 2 ** 30


def make_ids(vocab: int, seq: int, rows: int, seed: int = 1) -> torch.Tensor:
    """(rows, seq) int64 token ids in [3, vocab): the rows seed_stack.py trains on."""
    return torch.randint(3, vocab, (rows, seq), generator=torch.Generator().manual_seed(seed))


def hf_cosine(step: int, total: int, warm: int) -> float:
    """transformers' cosine-with-warmup multiplier (step 0 of a warmup runs at lr 0)."""
    if step < warm:
        return step / max(1, warm)
    return 0.5 * (1.0 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _memory(dev: torch.device) -> dict:
    if dev.type != "cuda":
        return {"peak_alloc_gib": None, "peak_reserved_gib": None}
    return {"peak_alloc_gib": round(torch.cuda.max_memory_allocated(dev) / GIB, 2),
            "peak_reserved_gib": round(torch.cuda.max_memory_reserved(dev) / GIB, 2)}


def _reset_memory(dev: torch.device) -> None:
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)


def _optimizer(params, dev: torch.device, lr: float, wd: float, classic: bool = False):
    """Paged AdamW 32-bit: fourbit's stream-ordered one as `train.loop._build_optimizer` builds it, or
    bitsandbytes' own class for the classic stack (torch's AdamW off CUDA)."""
    kw = dict(lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=wd)
    if dev.type != "cuda":
        return torch.optim.AdamW(params, **kw)
    if classic:
        import bitsandbytes as bnb
        return bnb.optim.PagedAdamW32bit(params, **kw)
    from .train.optim import paged_adamw
    return paged_adamw(32, params, **kw)


def _timed_loop(step_fn, dev, steps: int, warm: int, tokens_per_step: int) -> dict:
    losses, t0 = [], None
    for s in range(warm + steps):
        if s == warm:
            _sync(dev)
            t0 = time.perf_counter()
        losses.append(step_fn(s))
    _sync(dev)
    dt = time.perf_counter() - t0
    losses = [float(x) for x in losses]            # steps may return device scalars (no per-step sync)
    return {"tokens_per_s": round(steps * tokens_per_step / dt, 1), "s_per_step": round(dt / steps, 4),
            "losses": [round(x, 5) for x in losses], "loss": round(losses[-1], 5)}


def run_steps(model, ids: torch.Tensor, bsz: int, ga: int, steps: int, warm: int, policy: str = "off",
              r: int = 16, alpha: float = 32, dropout: float = 0.0, lr: float = 2e-4, wd: float = 0.001,
              max_grad_norm: float = 0.3, peak_tflops: float = 790.0, budget_gib: Optional[float] = None,
              lora_seed: int = 0, profile_path: Optional[str] = None, flat: bool = True,
              chunk: int = 0, switches: Optional[dict] = None,
              sync_each_step: bool = True, gc_off: bool = False, lowp_cache: bool = True,
              sdpa: Optional[str] = None, host_tail: bool = False, shape: Optional[str] = None) -> dict:
    """Train fourbit's way for warm + steps optimizer steps; undo LoRA and checkpointing after.

    Args:
        model: a frozen base (e.g. `build_random_model`); ids: (rows >= bsz*ga*(warm+steps), seq).
        policy: checkpointing policy keep | off | selective | full | offload | auto (auto: the memory
            plan's choice for `shape` within `budget_gib`, or the device's memory).
        flat: all LoRA weights in one buffer (`lora.FlatLoRA`): one optimizer tensor, one clip norm.
        chunk: LM-head tokens per chunk (0: auto).
        switches: `fourbit.switches.Switches` names set to False for this run (each undoes one
            fast-path change for an ablation row); all are back on afterwards.
    Returns:
        dict: tokens_per_s, s_per_step, peak_alloc_gib, peak_reserved_gib, loss (last step), losses,
        mfu (model FLOPs, no recompute, over `peak_tflops`), hfu (counting recompute), policy.
    """
    from .config import LoraConfig
    from .lora import FlatLoRA, apply_lora, cache_optimizer_steps, lora_parameters
    from .train.activations import apply_checkpointing, remove_checkpointing, unfuse_layers
    from .train.loss import causal_lm_loss
    dev = next(model.parameters()).device
    seq = ids.shape[1]
    _reset_memory(dev)
    names = apply_lora(model, LoraConfig(r=r, alpha=alpha, dropout=dropout, targets=TARGETS), seed=lora_seed)
    budget = int(budget_gib * GIB) if budget_gib else None
    import contextlib
    from torch.nn.attention import SDPBackend, sdpa_kernel
    switched = contextlib.ExitStack()
    switched.enter_context(Switches.set(**(switches or {})))     # back on in `finally`, whatever happens
    hook = None
    try:
        if policy == "auto":                  # the memory plan's choice, as `fourbit train` makes it
            policy = _plan_policy(shape, bsz, seq, r, alpha, dropout, dev, budget)
        chosen = apply_checkpointing(model, policy)
        model.train()
        fl = FlatLoRA(model) if flat else None
        params = [fl.flat] if fl else lora_parameters(model)
        opt = _optimizer(params, dev, lr, wd)
        hook = cache_optimizer_steps(opt, model) if lowp_cache else None      # as `fourbit train`
        total, warm_lr = warm + steps, math.ceil(0.03 * (warm + steps))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: hf_cosine(s, total, warm_lr))

        marks: list = []                  # (phase, perf_counter) when `host_tail` times the step's host side

        def mark(name: str) -> None:
            if host_tail:
                marks.append((name, time.perf_counter()))

        def step(s: int) -> float:
            s %= warm + steps                 # the profile and host-tail passes reuse the rows of the first steps
            n_train = bsz * ga * (seq - 1)
            loss_sum = 0.0
            mark("start")
            for j in range(ga):
                rows = ids[(s * ga + j) * bsz:(s * ga + j + 1) * bsz].to(dev, non_blocking=True)
                ls, _ = causal_lm_loss(model, {"input_ids": rows, "labels": rows}, chunk=chunk)
                mark("forward queued")
                (ls / n_train).backward()
                loss_sum = loss_sum + ls.detach()          # summed on the device
                del ls                                     # the graph's teardown while the GPU is busy
                mark("backward queued")
            if fl:
                fl.gather_grads()
            gnorm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            if hasattr(opt, "prefetch_states"):
                opt.prefetch_states()
            mark("gather + clip queued")
            if sync_each_step:            # as `fourbit train`: loss and norm read once, before the update
                loss_sum = torch.stack([loss_sum.float(), gnorm.float()]).tolist()[0]
            mark("host read (waits for the GPU)")
            opt.step()
            mark("optimizer step")
            sched.step()
            mark("scheduler")
            opt.zero_grad(set_to_none=True)
            if fl:
                fl.zero_grad()
            mark("zero_grad")
            return loss_sum / n_train

        if gc_off:
            gc.collect()
            gc.disable()
        backend = (sdpa_kernel([getattr(SDPBackend, sdpa.upper())]) if sdpa else contextlib.nullcontext())
        with backend:
            res = _timed_loop(step, dev, steps, warm, bsz * ga * seq)
            if profile_path:
                _profile(step, dev, profile_path)
            if host_tail:                 # 3 more steps, host time per phase (no profiler)
                if hasattr(opt, "prefetch_state"):            # bitsandbytes: its prefetch calls on their own
                    pre = opt.prefetch_state

                    def timed_prefetch(p_):
                        mark("optimizer: entry")
                        pre(p_)
                        mark("optimizer: prefetch")
                    opt.prefetch_state = timed_prefetch
                marks.clear()
                _sync(dev)
                for s in range(3):
                    step(s)
                _sync(dev)
                res["host_ms"] = _phase_ms(marks)
    finally:
        gc.enable()
        if hook is not None:
            hook.remove()
        remove_checkpointing(model)
        unfuse_layers(model)
        _unwrap_lora(model, names)
        switched.close()
    res.update(_memory(dev))
    cfg = model.config
    res["mfu"] = round(res["tokens_per_s"] * flops_per_token(cfg, seq, r, False) / (peak_tflops * 1e12), 4)
    res["hfu"] = round(res["tokens_per_s"] * flops_per_token(cfg, seq, r, chosen not in ("off", "keep"),
                                                            (switches or {}).get("split", True)
                                                            and chosen in ("selective", "offload"))
                       / (peak_tflops * 1e12), 4)
    res.update(system="fourbit", policy=chosen)
    return res


def _plan_policy(shape: Optional[str], bsz: int, seq: int, r: int, alpha: float, dropout: float,
                 dev: torch.device, budget: Optional[int]) -> str:
    """`checkpointing_policy: auto` for a bench row: `fourbit.plan` on the row's settings and shape,
    against `budget` bytes (default: the device's memory, as `fourbit train`)."""
    from .config import load_config
    from .plan import plan
    if shape is None:
        raise ValueError("policy auto in the bench needs the shape's name (run_steps(shape=...))")
    cfg = load_config(None, base={
        "model": f"shape:{shape}", "data": {"max_length": seq, "packing": False},
        "lora": {"r": r, "alpha": alpha, "dropout": dropout, "targets": list(TARGETS)},
        "train": {"micro_batch_size": bsz, "device": dev.type, "grad_checkpointing": True,
                  "checkpointing_policy": "auto"}})
    return plan(cfg, memory=f"{budget}B" if budget else None, device=dev.type).policy


def _phase_ms(marks: list) -> dict:
    """Mean host milliseconds spent reaching each mark from the one before (marks of several steps)."""
    acc: dict = {}
    for (_, t0), (name, t1) in zip(marks, marks[1:]):
        acc.setdefault("between steps" if name == "start" else name, []).append(1e3 * (t1 - t0))
    return {k: round(sum(v) / len(v), 3) for k, v in acc.items()}


def _profile(step_fn, dev, path: str) -> None:
    """One more step under torch.profiler; the kernel table (by device time) goes to `path`."""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=acts) as prof:
        step_fn(0)
        _sync(dev)
    key = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    with open(path, "w") as f:
        f.write(prof.key_averages().table(sort_by=key, row_limit=40, max_name_column_width=70))
        if dev.type == "cuda":
            f.write("\n" + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25,
                                                       max_name_column_width=70))
            import tempfile
            with profile(activities=acts) as prof3:          # 3 back-to-back steps: gaps between steps too
                for s in range(3):
                    step_fn(s)
                _sync(dev)
            with tempfile.NamedTemporaryFile(suffix=".json") as tmp:
                prof3.export_chrome_trace(tmp.name)
                f.write("\n3 consecutive steps:\n" + gpu_gaps(tmp.name))
    print(f"profile written to {path}", flush=True)


def gpu_gaps(trace_path: str, min_us: float = 20.0, top: int = 25) -> str:
    """Where the GPU sat idle in a chrome trace: total idle, and the largest gaps between kernels with
    the kernels around them and the innermost CPU op that launched the kernel after the gap."""
    with open(trace_path) as f:
        ev = json.load(f)["traceEvents"]
    dev = sorted((e for e in ev if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e),
                 key=lambda e: e["ts"])
    if not dev:
        return "no device events\n"
    launch = {e["args"].get("correlation"): e for e in ev if e.get("cat") == "cuda_runtime"}
    cpu_ops = sorted((e for e in ev if e.get("cat") == "cpu_op" and "dur" in e), key=lambda e: e["ts"])
    starts = [e["ts"] for e in cpu_ops]

    def innermost(ts):                  # the shortest CPU op covering ts, among the last 4000 started
        import bisect
        i = bisect.bisect_right(starts, ts)
        best = None
        for e in cpu_ops[max(0, i - 4000):i]:
            if e["ts"] + e["dur"] >= ts and (best is None or e["dur"] < best["dur"]):
                best = e
        return best["name"] if best else "?"
    gaps, end = [], dev[0]["ts"] + dev[0]["dur"]
    prev = dev[0]
    for e in dev[1:]:
        if e["ts"] - end > min_us:
            gaps.append((e["ts"] - end, prev, e))
        if e["ts"] + e["dur"] > end:
            end, prev = e["ts"] + e["dur"], e
    span = end - dev[0]["ts"]
    busy = span - sum(g for g, _, _ in gaps)
    out = [f"GPU span {span / 1e3:.1f} ms, idle in gaps > {min_us:.0f} us: {(span - busy) / 1e3:.1f} ms "
           f"({len(gaps)} gaps)", f"largest {top}: gap_us | kernel before | kernel after | CPU op launching it"]
    by_op: dict = {}
    for g, a, b in gaps:
        rt = launch.get(b["args"].get("correlation"))
        op = innermost(rt["ts"]) if rt else "?"
        by_op[op] = by_op.get(op, 0.0) + g
        b["_op"] = op
    for g, a, b in sorted(gaps, key=lambda x: -x[0])[:top]:
        out.append(f"{g:9.0f} | {a['name'][:50]} | {b['name'][:50]} | {b.get('_op', '?')[:60]}")
    out.append("idle by the CPU op that launched the kernel after the gap (ms):")
    for op, g in sorted(by_op.items(), key=lambda x: -x[1])[:15]:
        out.append(f"{g / 1e3:8.2f}  {op[:90]}")
    return "\n".join(out) + "\n"


def _unwrap_lora(model, names: list[str]) -> None:
    for name in names:
        parent, _, child = name.rpartition(".")
        holder = model.get_submodule(parent)
        setattr(holder, child, getattr(holder, child).base_layer)


def run_classic(model, ids: torch.Tensor, bsz: int, ga: int, steps: int, warm: int, ckpt: bool = True,
                r: int = 16, alpha: float = 32, dropout: float = 0.0, lr: float = 2e-4, wd: float = 0.001,
                max_grad_norm: float = 0.3, peak_tflops: float = 790.0) -> dict:
    """The classic stack's step (prepare_model_for_kbit_training + peft LoRA + the model's own loss under
    bf16 autocast, HF gradient checkpointing) on the same model and rows. Leaves the model changed
    (peft casts embeddings, norms and head to fp32): run it last."""
    from peft import LoraConfig as PeftLora, get_peft_model, prepare_model_for_kbit_training
    dev = next(model.parameters()).device
    seq = ids.shape[1]
    _reset_memory(dev)
    model.is_loaded_in_4bit = True
    for p in model.parameters():
        p.requires_grad_(False)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=ckpt,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    pm = get_peft_model(model, PeftLora(r=r, lora_alpha=alpha, target_modules=TARGETS, lora_dropout=dropout,
                                        bias="none", task_type="CAUSAL_LM"))
    pm.train()
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = _optimizer(params, dev, lr, wd, classic=True)
    total, warm_lr = warm + steps, math.ceil(0.03 * (warm + steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: hf_cosine(s, total, warm_lr))
    amp = dict(device_type=dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")

    def step(s: int) -> float:
        tot = 0.0
        for j in range(ga):
            rows = ids[(s * ga + j) * bsz:(s * ga + j + 1) * bsz].to(dev, non_blocking=True)
            with torch.autocast(**amp):
                loss = pm(input_ids=rows, labels=rows).loss
            (loss / ga).backward()
            tot += float(loss.detach()) / ga
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        return tot

    res = _timed_loop(step, dev, steps, warm, bsz * ga * seq)
    res.update(_memory(dev))
    cfg = model.config
    res["mfu"] = round(res["tokens_per_s"] * flops_per_token(cfg, seq, r, False) / (peak_tflops * 1e12), 4)
    res["hfu"] = round(res["tokens_per_s"] * flops_per_token(cfg, seq, r, ckpt) / (peak_tflops * 1e12), 4)
    res.update(system="classic", policy="full" if ckpt else "off")
    return res


def run_seed_stack(path: str, a) -> Optional[dict]:
    """The shared seed_stack.py (trl SFTTrainer) in a subprocess; its RESULT line, or None."""
    import subprocess
    cmd = [sys.executable, path, "--shape", a.shape, "--seq", str(a.seq), "--bsz", str(a.bsz), "--ga", str(a.ga),
           "--steps", str(a.steps), "--warm", str(a.warm), "--ckpt", "1", "--dropout", str(a.dropout),
           "--workdir", "/tmp/seed_stack_model"] + (["--cpu"] if a.device == "cpu" else [])
    print("$ " + " ".join(cmd), flush=True)
    p = subprocess.run(cmd, capture_output=True, text=True)
    sys.stdout.write(p.stdout[-4000:])
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            res = json.loads(line[7:])
            return dict(system="seed_stack(trl)", policy="full", tokens_per_s=res["tokens_per_s"],
                        peak_alloc_gib=res.get("peak_alloc_gib"), peak_reserved_gib=res.get("peak_reserved_gib"),
                        losses=res.get("losses"), loss=(res.get("losses") or [None])[-1])
    sys.stdout.write(p.stderr[-3000:])
    return None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fourbit bench", description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="tiny", choices=sorted(SHAPES))
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--bsz", type=int, default=4)
    p.add_argument("--ga", type=int, default=1)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warm", type=int, default=2)
    p.add_argument("--runs", default="off,offload,classic",
                   help="comma list: fourbit policies keep|off|selective|full|offload|auto (suffixes :noflat :nogroup :chunkN undo a round-2 change, :nosplit :norope :noce a round-3 one, :noloraorder a round-5 one; :nosync reads losses once at the end, :gcoff disables Python's GC, :nolowp casts LoRA weights per call, :sdpa=flash_attention|cudnn_attention|efficient_attention picks SDPA's backend), "
                        "and classic|classic-nockpt (last)")
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--host-tail", action="store_true",
                   help="after each fourbit run, time 3 more steps' host side by phase (ms, in the RESULT line)")
    p.add_argument("--budget-gib", type=float, default=None, help="memory budget for the auto policy")
    p.add_argument("--device", default="auto")
    p.add_argument("--quant", default="nf4", choices=["nf4", "none"])
    p.add_argument("--peak-tflops", type=float, default=790.0, help="bf16 rate MFU is measured against")
    p.add_argument("--seed-stack", default=None, help="path to shared/bench/seed_stack.py: also run it (trl)")
    p.add_argument("--no-flat", action="store_true", help="one optimizer tensor per LoRA weight (round 1)")
    p.add_argument("--json", default=None, help="write all results to this file")
    p.add_argument("--profile", default=None, help="folder: profile one extra step of each fourbit run there")
    return p


def table(results: list[dict], classic: Optional[dict]) -> str:
    unsloth = {"keep": 14424.0, "off": 14424.0, "full": 10312.0, "offload": 10312.0}
    rows = ["| system | ckpt | tokens/s | s/step | peak alloc GiB | peak reserved GiB | MFU | HFU | loss (last) "
            "| x classic | x Unsloth (ANCHORS) |", "|" + " --- |" * 11]
    for r in results:
        ratio = f"{r['tokens_per_s'] / classic['tokens_per_s']:.2f}" if classic else "-"
        un = unsloth.get(r.get("policy")) if r["system"] == "fourbit" else None
        rows.append(f"| {r['system']} | {r.get('run') or r.get('policy')} | {r['tokens_per_s']:,.0f} | {r.get('s_per_step', '-')} | "
                    f"{r.get('peak_alloc_gib')} | {r.get('peak_reserved_gib')} | {r.get('mfu', '-')} | "
                    f"{r.get('hfu', '-')} | {r.get('loss')} | {ratio} | "
                    f"{'%.2f' % (r['tokens_per_s'] / un) if un else '-'} |")
    return "\n".join(rows)


def main(argv: list[str]) -> int:
    p = parser()
    a = p.parse_args(argv)
    runs = [x.strip() for x in a.runs.split(",") if x.strip()]
    known = set(Switches.SUFFIXES) | {"noflat", "nosync", "gcoff", "nolowp"}
    for run in runs:
        bad = [o for o in run.split(":")[1:] if o not in known and not o.startswith(("chunk", "sdpa="))]
        if bad:
            p.error(f"run {run!r}: unknown suffix(es) {bad}; known: {sorted(known)}, chunkN, sdpa=BACKEND")
    from .model import resolve_device
    dev = resolve_device(a.device)
    if dev.type == "cpu" and a.quant == "nf4":
        print("note: on CPU the peak-memory columns are empty and MFU is against the GPU rate", flush=True)
    t0 = time.time()
    model = build_random_model(a.shape, dev, quant=a.quant)
    _sync(dev)
    print(f"built {a.shape} ({a.quant}) on {dev} in {time.time() - t0:.1f}s; allocated "
          f"{torch.cuda.memory_allocated(dev) / GIB if dev.type == 'cuda' else 0:.2f} GiB", flush=True)
    ids = make_ids(model.config.vocab_size, a.seq, a.bsz * a.ga * (a.steps + a.warm))
    if dev.type == "cuda":
        ids = ids.pin_memory()                       # so the per-step copy is truly non-blocking
    results, classic = [], None
    runs = [x for x in runs if not x.startswith("classic")] + [x for x in runs if x.startswith("classic")]
    common = dict(bsz=a.bsz, ga=a.ga, steps=a.steps, warm=a.warm, dropout=a.dropout, peak_tflops=a.peak_tflops)
    for run in runs:
        t1 = time.time()
        if run.startswith("classic"):
            if any(r["system"] == "classic" for r in results):
                print(f"skip {run}: the classic stack changes the model; one classic run per call", flush=True)
                continue
            res = run_classic(model, ids, ckpt=run == "classic", **common)
            classic = res
        else:
            prof = f"{a.profile}/profile_{a.shape}_{run.replace(':', '_')}.txt" if a.profile else None
            policy, *opts = run.split(":")    # off:noflat / :nogroup / :chunk2048 = without one change
            chunk = next((int(o[5:]) for o in opts if o.startswith("chunk")), 0)
            res = run_steps(model, ids, policy=policy, budget_gib=a.budget_gib, profile_path=prof,
                            flat=not a.no_flat and "noflat" not in opts, chunk=chunk,
                            switches={Switches.SUFFIXES[o]: False for o in opts if o in Switches.SUFFIXES},
                            sync_each_step="nosync" not in opts, host_tail=a.host_tail, shape=a.shape,
                            gc_off="gcoff" in opts, lowp_cache="nolowp" not in opts,
                            sdpa=next((o[5:] for o in opts if o.startswith("sdpa=")), None), **common)
        res.update(shape=a.shape, seq=a.seq, bsz=a.bsz, ga=a.ga, run=run, wall_s=round(time.time() - t1, 1))
        print("RESULT " + json.dumps(res), flush=True)
        results.append(res)
    if a.seed_stack:
        del model
        _reset_memory(dev)
        res = run_seed_stack(a.seed_stack, a)
        if res:
            print("RESULT " + json.dumps(res), flush=True)
            results.append(res)
    ref = classic or next((r for r in results if r["system"].startswith("seed_stack")), None)
    if ref:
        for r in results:
            if r is not ref and r.get("losses") and ref.get("losses"):
                n = min(len(r["losses"]), len(ref["losses"]))
                r["max_loss_diff_vs_ref"] = round(max(abs(x - y) for x, y in zip(r["losses"][:n], ref["losses"][:n])), 5)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)
    print(table(results, ref))
    for r in results:
        print(f"losses {r['system']}:{r.get('policy')}: {r.get('losses')} max|diff| vs ref {r.get('max_loss_diff_vs_ref')}")
    return 0


def bench_cmd(args: argparse.Namespace, extra: list[str]) -> int:
    """Entry of `fourbit bench [options]` (options parsed here; see `fourbit bench --help`)."""
    return main(extra)

"""Memory plan vs measured: `fourbit plan`'s prediction beside the real peak of fourbit's training step.

    python benchmarks/memory_plan.py --grid cpu --out results/memory_plan_cpu.jsonl    # peak RSS, tiny + SmolLM2
    python benchmarks/memory_plan.py --grid gpu --out $OUT/memory_plan_gpu.jsonl --budget-s 480   # max reserved

The predictions of every row are written first (`<out>.pred.jsonl`, with the commit and time: the
plan before the run), then each shape runs in a fresh subprocess (GPU: the model is built once, then
each setting runs after `empty_cache` + `reset_peak_memory_stats`; CPU: one subprocess per setting,
since peak RSS cannot be reset). The model is random, built on the meta device and quantized one
linear at a time on the target device (a 70B shape never exists in 16 bits). The step is `fourbit
train`'s own (`plan_calibrate`: prepare_run's setup, `loop._accumulate_and_step`) on full-length
random rows (no padding, no mask). Before the measured step(s), AdamW's states are created with a
zero-gradient step. CPU rows run 2 steps (the peak RSS of both: the heap keeps what the first
freed); the 70B rows under the 48 GiB cap run 3. `--budget-s` skips the shapes that would start
after that many seconds (the GPU grid is ordered by priority: 70B, 8B, SmolLM2, tiny).
The last lines printed are a table; every record is written to --out as JSON lines.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "src"))

GiB = 1024 ** 3
CAP_70B = 48 * GiB     # the seed's claim: a 70B-class QLoRA run inside a 48 GB GPU
DROPOUT = 0.05         # lora.dropout's default; 0 turns on the grouped q/k/v and gate/up GEMMs on CUDA


def _rows(shape, seqs, policies, micro=1, dropout=DROPOUT):
    return [(shape, micro, t, p, dropout) for t in seqs for p in policies]


GRIDS = {
    # (shape, micro_batch, seq, policy, lora dropout)
    "cpu": _rows("tiny", (512, 2048), ("off",)) + _rows("tiny", (2048,), ("full",), micro=4)
           + _rows("smollm2-135m", (256,), ("off",)) + _rows("smollm2-135m", (1024,), ("off", "selective", "full"))
           + _rows("smollm2-135m", (2048,), ("selective", "full"), micro=2)
           # rows the CPU heap-retention constants were not fit on (plan.CPU_RETAIN*)
           + _rows("tiny", (8192,), ("off", "selective")) + _rows("smollm2-135m", (512,), ("selective",))
           + _rows("smollm2-135m", (2048,), ("off", "selective")) + _rows("smollm2-135m", (1024,), ("full",), micro=2),
    "gpu": _rows("llama3-70b", (2048,), ("full", "offload")) + _rows("llama3-70b", (512,), ("off", "full"))
           + _rows("llama3-70b", (2048,), ("off",)) + _rows("llama3-70b", (8192,), ("full",))
           + _rows("llama3-8b", (512, 2048), ("off", "full"))
           + _rows("llama3-8b", (2048,), ("full", "selective", "offload"), micro=4)
           + _rows("llama3-8b", (8192,), ("off", "full", "selective", "offload"))
           + _rows("llama3-8b", (2048,), ("off",), dropout=0.0) + _rows("llama3-8b", (2048,), ("selective",), 4, 0.0)
           + _rows("llama3-8b", (8192,), ("selective",), dropout=0.0)
           + _rows("smollm2-135m", (512, 2048, 8192), ("off", "full")) + _rows("smollm2-135m", (2048,), ("selective",))
           + _rows("smollm2-135m", (2048,), ("off",), dropout=0.0)
           + _rows("tiny", (512, 2048, 8192), ("off", "full")),
    # settings the constants were not fit on (run after the gpu grid, predictions written first)
    "verify": [("llama3-70b", 1, 4096, "offload", 0.05), ("llama3-70b", 2, 1024, "full", 0.0),
               ("llama3-8b", 2, 4096, "full", 0.05), ("llama3-8b", 2, 1024, "off", 0.05),
               ("llama3-8b", 1, 4096, "selective", 0.0), ("llama3-8b", 8, 1024, "offload", 0.0),
               ("smollm2-135m", 4, 1024, "full", 0.05), ("smollm2-135m", 2, 4096, "off", 0.0),
               ("smollm2-135m", 1, 4096, "selective", 0.05), ("smollm2-135m", 1, 1024, "offload", 0.05),
               ("tiny", 4, 1024, "full", 0.05), ("tiny", 2, 4096, "off", 0.05)],
    # policy `keep` (session 3): predictions written before the run
    "keep": [("llama3-8b", 4, 2048, "keep", 0.0), ("llama3-8b", 1, 2048, "keep", 0.05),
             ("smollm2-135m", 2, 2048, "keep", 0.0)],
    # LM-head chunks sized for the CUDA kernel's 2V bytes a token (session 3, after the final call)
    "chunk": [("llama3-8b", 4, 2048, "offload", 0.0), ("llama3-8b", 4, 2048, "keep", 0.0),
              ("smollm2-135m", 2, 2048, "off", 0.0), ("smollm2-135m", 4, 2048, "selective", 0.0)],
    "smoke": _rows("tiny", (128,), ("off",)) + _rows("tiny", (128,), ("selective", "full"), micro=2),
}


def capped(shape: str, seq: int, policy: str, device: str) -> bool:
    """The rows of the seed's claim: Llama-3-70B shape at 2048 tokens with checkpointing, torch's
    allocator capped at 48 GiB."""
    return device == "cuda" and shape == "llama3-70b" and seq == 2048 and policy != "off"


def make_cfg(shape: str, micro: int, seq: int, policy: str, device: str, dropout: float = DROPOUT):
    """The run config of one setting; the policy itself is passed to `estimate` and `prepare` (the
    config's checkpointing_policy stays auto, so any policy name the code knows can be measured)."""
    from fourbit.config import load_config
    return load_config(None, [f"--model=shape:{shape}", f"--train.micro_batch_size={micro}",
                              f"--data.max_length={seq}", f"--train.grad_checkpointing={policy != 'off'}",
                              f"--lora.dropout={dropout}", f"--train.device={device}"])


def predict(shape, micro, seq, policy, device, spec=None, dropout: float = DROPOUT):
    from fourbit.plan import estimate
    from fourbit.plan_model import model_spec
    cfg = make_cfg(shape, micro, seq, policy, device, dropout)
    spec = spec or model_spec(cfg.model)
    rep = estimate(cfg, spec, device, policy=policy, masked=False)      # random full-length rows: no mask
    return rep, {i.key: i.bytes for i in rep.items}


def _vm(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _heap() -> dict:
    """glibc's view of the heap (mallinfo2): bytes in use, in the arenas, mmapped; {} off glibc."""
    try:
        import ctypes

        class MI(ctypes.Structure):
            _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                       "fsmblks", "uordblks", "fordblks", "keepcost")]
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = MI
        m = libc.mallinfo2()
        return dict(heap_in_use=m.uordblks + m.hblkhd, heap_arena=m.arena, heap_mmapped=m.hblkhd)
    except (OSError, AttributeError):
        return {}


def worker(shape: str, settings: list, device_name: str, out: str, steps_70b: int, steps_cpu: int) -> None:
    """One process: build the shape once, run each setting, append a JSON record per setting."""
    import torch
    from fourbit.model import quiet_bitsandbytes
    from fourbit.plan_calibrate import random_nf4_model, zero_step, one_step, prepare
    quiet_bitsandbytes()
    device = torch.device(device_name)
    rss_imports = _vm("VmRSS")
    t0 = time.perf_counter()
    model = random_nf4_model(shape, device)
    build_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.synchronize()
        after_build = torch.cuda.memory_allocated()
    for micro, seq, policy, dropout in settings:
        rec = dict(shape=shape, micro=micro, seq=seq, policy=policy, dropout=dropout, device=device.type,
                   build_s=round(build_s, 1))
        cfg = make_cfg(shape, micro, seq, policy, device.type, dropout)
        cap = capped(shape, seq, policy, device.type)
        run = None
        try:
            run = prepare(model, cfg, policy)
            zero_step(run)                               # AdamW states exist before the measured step
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                if cap:
                    total = torch.cuda.get_device_properties(0).total_memory
                    torch.cuda.set_per_process_memory_fraction(CAP_70B / total)
                    rec["allocator_cap_gib"] = CAP_70B / GiB
            n = steps_70b if cap else (steps_cpu if device.type == "cpu" else 1)
            losses, times = [], []
            for s in range(n):
                t = time.perf_counter()
                losses.append(one_step(run, micro, seq, seed=s))
                times.append(time.perf_counter() - t)
            rec.update(losses=[round(x, 4) for x in losses], s_per_step=round(min(times), 3))
            if device.type == "cuda":
                free, total = torch.cuda.mem_get_info()
                rec.update(peak_allocated=torch.cuda.max_memory_allocated(),
                           peak_reserved=torch.cuda.max_memory_reserved(),
                           outside_torch=(total - free) - torch.cuda.memory_reserved(),
                           on_gpu_after=total - free, model_allocated=after_build)
            else:
                rec.update(peak_rss=_vm("VmHWM"), rss_after=_vm("VmRSS"), rss_imports=rss_imports, **_heap())
        except torch.cuda.OutOfMemoryError as e:
            rec["error"] = "OOM: " + str(e).split("\n")[0][:200]
        except Exception as e:                          # one broken row must not lose the shape's others
            import traceback
            traceback.print_exc()
            rec["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        finally:
            run = None
            if device.type == "cuda":
                if cap:
                    torch.cuda.set_per_process_memory_fraction(1.0)
                torch.cuda.empty_cache()
        with open(out, "a") as f:
            f.write(json.dumps(rec) + "\n")
        print("RECORD", json.dumps(rec), flush=True)


def table(records: list, preds: dict) -> str:
    rows = ["| shape | micro x seq | ckpt | dropout | predicted | measured | error | note |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in records:
        key = (r["shape"], r["micro"], r["seq"], r["policy"], r.get("dropout", DROPOUT))
        p = preds.get(key)
        meas = r.get("peak_reserved") or r.get("peak_rss")
        head = f"| {r['shape']} | {r['micro']} x {r['seq']} | {r['policy']} | {key[4]:g} | "
        if "error" in r or meas is None or p is None:
            rows.append(head + f"{(p or 0) / GiB:.2f} GiB | - | - | {r.get('error', '')[:60]} |")
            continue
        err = 100 * (p - meas) / meas
        note = f"{r.get('s_per_step', 0):.2f} s/step"
        if "allocator_cap_gib" in r:
            note += (f"; allocator capped at {r['allocator_cap_gib']:.0f} GiB, {r['on_gpu_after'] / GiB:.2f} GiB on the "
                     f"GPU after; losses {r['losses']}")
        rows.append(head + f"{p / GiB:.2f} GiB | {meas / GiB:.2f} GiB | {err:+.1f}% | {note} |")
    return "\n".join(rows)


def _commit() -> str:
    try:
        return subprocess.run(["git", "-C", HERE, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=10).stdout.strip() + ("+dirty" if subprocess.run(
            ["git", "-C", HERE, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
            timeout=10).stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "?"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--grid", choices=sorted(GRIDS), default="cpu")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda for the gpu grid)")
    ap.add_argument("--out", default="memory_plan.jsonl")
    ap.add_argument("--only", default=None, help="comma list of shapes to run")
    ap.add_argument("--steps-70b", type=int, default=3)
    ap.add_argument("--steps-cpu", type=int, default=2)
    ap.add_argument("--timeout", type=int, default=300, help="seconds per subprocess")
    ap.add_argument("--budget-s", type=int, default=0, help="start no shape after this many seconds (0: no limit)")
    ap.add_argument("--fresh", default="tiny,smollm2-135m",
                    help="GPU: shapes whose settings each run in their own process (as a real run does; a small "
                         "shape's peak is otherwise lifted by segments the previous setting left reserved)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--settings", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    device = a.device or ("cpu" if a.grid in ("cpu", "smoke") else "cuda")
    if a.worker:
        worker(a.worker, json.loads(a.settings), device, a.out, a.steps_70b, a.steps_cpu)
        return
    t_start = time.perf_counter()
    grid = [g for g in GRIDS[a.grid] if a.only is None or g[0] in a.only.split(",")]
    specs, preds = {}, {}
    from fourbit.plan_model import model_spec
    pred_path = (a.out[:-len(".jsonl")] if a.out.endswith(".jsonl") else a.out) + ".pred.jsonl"
    stamp = dict(commit=_commit(), time=time.strftime("%Y-%m-%d %H:%M:%S"), device=device)
    with open(pred_path, "w") as f:                    # the plan before the run
        for shape, micro, seq, policy, dropout in grid:
            spec = specs.setdefault(shape, model_spec(f"shape:{shape}"))
            rep, parts = predict(shape, micro, seq, policy, device, spec, dropout)
            preds[(shape, micro, seq, policy, dropout)] = rep.allocator_peak
            f.write(json.dumps(dict(shape=shape, micro=micro, seq=seq, policy=policy, dropout=dropout,
                                    predicted=rep.allocator_peak, predicted_total=rep.total, parts=parts,
                                    **stamp)) + "\n")
    print(f"predictions written to {pred_path} ({stamp['commit']}, {stamp['time']})", flush=True)
    groups: list = []
    for shape, micro, seq, policy, dropout in grid:
        if device == "cpu" or shape in a.fresh.split(",") or not groups or groups[-1][0] != shape:
            groups.append((shape, []))
        groups[-1][1].append((micro, seq, policy, dropout))
    if os.path.exists(a.out):
        os.remove(a.out)
    for shape, settings in groups:
        if a.budget_s and time.perf_counter() - t_start > a.budget_s:
            print(f"{shape} {settings}: skipped (--budget-s {a.budget_s} spent)", flush=True)
            continue
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", shape, "--settings", json.dumps(settings),
               "--device", device, "--out", a.out, "--steps-70b", str(a.steps_70b), "--steps-cpu", str(a.steps_cpu)]
        t = time.perf_counter()
        left = a.budget_s - (t - t_start) + 30 if a.budget_s else a.timeout
        try:
            p = subprocess.run(cmd, timeout=max(30, min(a.timeout, left)), capture_output=True, text=True)
            tail = (p.stdout + p.stderr).strip().splitlines()
            bad = p.returncode != 0
        except subprocess.TimeoutExpired:
            tail, bad = ["timeout"], True
        print(f"{shape} {settings}: {time.perf_counter() - t:.0f}s" + (f" FAILED: {' | '.join(tail[-6:])}" if bad else ""),
              flush=True)
    records = [json.loads(l) for l in open(a.out)] if os.path.exists(a.out) else []
    print(f"total {time.perf_counter() - t_start:.0f}s")
    print(table(records, preds))


if __name__ == "__main__":
    main()

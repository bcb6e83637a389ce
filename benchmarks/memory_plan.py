"""Memory plan vs measured: `fourbit plan`'s prediction beside the real peak of fourbit's training step.

    python benchmarks/memory_plan.py --grid cpu   --out results_cpu.jsonl     # peak RSS, tiny + SmolLM2
    python benchmarks/memory_plan.py --grid gpu   --out results_gpu.jsonl     # max reserved, 4 shapes

Each shape runs in a fresh subprocess (GPU: the model is built once, then each setting runs after
`empty_cache` + `reset_peak_memory_stats`; CPU: one subprocess per setting, since peak RSS cannot
be reset). The model is random, built on the meta device and quantized one linear at a time on the
target device (a 70B shape never exists in 16 bits). Before the measured step, AdamW's states are
created with a zero-gradient step, so one step shows the steady-state peak. The step is fourbit's:
`causal_lm_loss` (chunked LM-head CE) on full-length random rows (no padding, no mask), our
LoRALinear, transformers' non-reentrant checkpointing, the configured (paged) AdamW.
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

GRIDS = {
    # (shape, micro_batch, seq, policy)
    "cpu": [("tiny", 1, 512, "off"), ("tiny", 1, 2048, "off"), ("tiny", 4, 2048, "full"),
            ("smollm2-135m", 1, 256, "off"), ("smollm2-135m", 1, 1024, "off"), ("smollm2-135m", 1, 1024, "full"),
            ("smollm2-135m", 2, 2048, "full")],
    "gpu": [("llama3-70b", 1, 2048, "full"), ("llama3-70b", 1, 512, "off"), ("llama3-70b", 1, 512, "full"),
            ("llama3-70b", 1, 8192, "full"),
            ("llama3-8b", 4, 2048, "full"), ("llama3-8b", 1, 8192, "offload")]
           + [(s, 1, t, p) for s in ("llama3-8b", "smollm2-135m", "tiny") for t in (512, 2048, 8192)
              for p in ("off", "full")],
    "smoke": [("tiny", 1, 128, "off"), ("tiny", 2, 128, "full")],
}
CAP_70B = 48 * GiB     # the seed's claim: a 70B-class QLoRA run inside a 48 GB GPU
DROPOUT = 0.05         # lora.dropout's default; 0 turns on the grouped q/k/v and gate/up GEMMs on CUDA


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


def worker(shape: str, settings: list, device_name: str, out: str, steps_70b: int) -> None:
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
    for micro, seq, policy in settings:
        rec = dict(shape=shape, micro=micro, seq=seq, policy=policy, device=device.type, build_s=round(build_s, 1))
        cfg = make_cfg(shape, micro, seq, policy, device.type)
        cap = device.type == "cuda" and shape == "llama3-70b" and seq == 2048 and policy == "full"
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
            n = steps_70b if cap else 1
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
                           model_allocated=after_build)
                if cap:
                    torch.cuda.set_per_process_memory_fraction(1.0)
            else:
                rec.update(peak_rss=_vm("VmHWM"), rss_imports=rss_imports)
        except torch.cuda.OutOfMemoryError as e:
            rec["error"] = "OOM: " + str(e).split("\n")[0][:200]
        finally:
            run = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
        with open(out, "a") as f:
            f.write(json.dumps(rec) + "\n")
        print("RECORD", json.dumps(rec), flush=True)


def table(records: list, preds: dict) -> str:
    rows = ["| shape | micro x seq | ckpt | predicted | measured | error | note |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in records:
        key = (r["shape"], r["micro"], r["seq"], r["policy"])
        p = preds.get(key)
        meas = r.get("peak_reserved") or r.get("peak_rss")
        if "error" in r or meas is None or p is None:
            rows.append(f"| {r['shape']} | {r['micro']} x {r['seq']} | {r['policy']} | "
                        f"{(p or 0) / GiB:.2f} GiB | - | - | {r.get('error', '')[:60]} |")
            continue
        err = 100 * (p - meas) / meas
        note = f"{r.get('s_per_step', 0):.2f} s/step"
        if "allocator_cap_gib" in r:
            note += f"; allocator capped at {r['allocator_cap_gib']:.0f} GiB; losses {r['losses']}"
        rows.append(f"| {r['shape']} | {r['micro']} x {r['seq']} | {r['policy']} | {p / GiB:.2f} GiB | "
                    f"{meas / GiB:.2f} GiB | {err:+.1f}% | {note} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--grid", choices=sorted(GRIDS), default="cpu")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda for the gpu grid)")
    ap.add_argument("--out", default="memory_plan.jsonl")
    ap.add_argument("--only", default=None, help="comma list of shapes to run")
    ap.add_argument("--steps-70b", type=int, default=3)
    ap.add_argument("--timeout", type=int, default=300, help="seconds per subprocess")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--settings", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    device = a.device or ("cuda" if a.grid == "gpu" else "cpu")
    if a.worker:
        worker(a.worker, json.loads(a.settings), device, a.out, a.steps_70b)
        return
    grid = [g for g in GRIDS[a.grid] if a.only is None or g[0] in a.only.split(",")]
    specs, preds = {}, {}
    from fourbit.plan_model import model_spec
    for shape, micro, seq, policy in grid:
        spec = specs.setdefault(shape, model_spec(f"shape:{shape}"))
        rep, parts = predict(shape, micro, seq, policy, device, spec)
        preds[(shape, micro, seq, policy)] = rep.allocator_peak
        with open(a.out + ".pred", "a") as f:
            f.write(json.dumps(dict(shape=shape, micro=micro, seq=seq, policy=policy, predicted=rep.allocator_peak,
                                    predicted_total=rep.total, parts=parts)) + "\n")
    groups: list = []
    for shape, micro, seq, policy in grid:
        if device == "cpu" or not groups or groups[-1][0] != shape:
            groups.append((shape, []))
        groups[-1][1].append((micro, seq, policy))
    if os.path.exists(a.out):
        os.remove(a.out)
    for shape, settings in groups:
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", shape, "--settings", json.dumps(settings),
               "--device", device, "--out", a.out, "--steps-70b", str(a.steps_70b)]
        t = time.perf_counter()
        try:
            p = subprocess.run(cmd, timeout=a.timeout, capture_output=True, text=True)
            tail = (p.stdout + p.stderr).strip().splitlines()
            bad = p.returncode != 0
        except subprocess.TimeoutExpired:
            tail, bad = ["timeout"], True
        print(f"{shape} {settings}: {time.perf_counter() - t:.0f}s" + (f" FAILED: {' | '.join(tail[-6:])}" if bad else ""),
              flush=True)
    records = [json.loads(l) for l in open(a.out)] if os.path.exists(a.out) else []
    print(table(records, preds))


if __name__ == "__main__":
    main()

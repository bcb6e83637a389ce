"""Kernel benchmarks: NF4 dequantization (ours vs bitsandbytes) and the chunked LM-head loss.

    python benchmarks/kernels_bench.py            # CUDA: Llama-3-8B shapes; CPU: tiny shapes
    python benchmarks/kernels_bench.py --ptx      # sm_90 PTX instruction counts, no GPU needed

Dequant: median time (triton.testing.do_bench on CUDA), effective TB/s where bytes = packed
weight + output (2 bytes/value in bf16) + scales (uint8 absmax, fp32 second-level scales, code
tables), and a bit-exactness check against bitsandbytes on the same random weight.
Loss: forward + backward of the chunked loss vs the plain path (full logits -> fp32 -> cross
entropy), time and peak allocated memory above the inputs.
Prints a table and a final `RESULT {json}` line.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from fourbit.kernels import nf4  # noqa: E402
from fourbit.kernels.lm_loss import lm_head_loss, lm_head_loss_reference  # noqa: E402

CUDA = torch.cuda.is_available()


def bench(fn, warmup=3, reps=10) -> float:
    """Median seconds per call."""
    if CUDA:
        import triton.testing
        return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median") / 1e3
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def effective_bytes(packed, st: nf4.NF4State) -> int:
    scales = st.absmax.numel() * st.absmax.element_size() + st.code.numel() * 4
    if st.nested:
        scales += st.absmax2.numel() * 4 + st.code2.numel() * 4 + 4
    return packed.numel() * packed.element_size() + st.numel * torch.empty((), dtype=st.dtype).element_size() + scales


def dequant_rows(shapes, blocksize=64, nested=True, dtype=torch.bfloat16):
    import bitsandbytes.functional as bnbf
    dev = "cuda" if CUDA else "cpu"
    rows = []
    for shape in shapes:
        g = torch.Generator(device=dev).manual_seed(0)
        w = torch.randn(shape, device=dev, generator=g).to(dtype)
        packed, qs = bnbf.quantize_4bit(w, blocksize=blocksize, compress_statistics=nested, quant_type="nf4")
        del w
        st = nf4.NF4State.from_quant_state(qs)
        nbytes = effective_bytes(packed, st)
        expect = bnbf.dequantize_4bit(packed, qs)
        ours = (lambda: nf4.dequantize_nf4(packed, st)) if CUDA else (lambda: nf4.dequantize_nf4_reference(packed, st))
        row = {"shape": list(shape), "blocksize": blocksize, "nested": nested, "bytes": nbytes,
               "exact_vs_bnb": bool(torch.equal(ours(), expect))}
        row["ours_us"] = bench(ours) * 1e6
        row["bnb_us"] = bench(lambda: bnbf.dequantize_4bit(packed, qs)) * 1e6
        if CUDA:
            out = torch.empty_like(expect)
            row["ours_out_us"] = bench(lambda: nf4.dequantize_nf4(packed, st, out=out)) * 1e6
            src = torch.empty(nbytes // 4, dtype=torch.bfloat16, device=dev)
            dst = torch.empty_like(src)   # a copy moving the same bytes (half read, half written): the ceiling
            row["copy_us"] = bench(lambda: dst.copy_(src)) * 1e6
            del src, dst, out
        else:
            row["exact_fast_path"] = bool(torch.equal(nf4.dequantize_nf4_fast(packed, qs), expect))
        for k in ("ours", "bnb", "copy"):
            if f"{k}_us" in row:
                row[f"{k}_TBps"] = nbytes / (row[f"{k}_us"] * 1e-6) / 1e12
        rows.append(row)
        del packed, qs, st, expect
    return rows


def dequant_sweep(shape=(4096, 14336)):
    """Launch-shape sweep of our kernel (CUDA only): bytes/program x warps x load width."""
    import bitsandbytes.functional as bnbf
    w = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    packed, qs = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    st = nf4.NF4State.from_quant_state(qs)
    nbytes, out = effective_bytes(packed, st), torch.empty_like(w)
    expect = bnbf.dequantize_4bit(packed, qs)
    res = []
    for bpp in (2048, 4096, 8192, 16384):
        for warps in (4, 8):
            for vec in (4, 16):
                kw = dict(bytes_per_program=bpp, num_warps=warps, vec=vec)
                try:
                    exact = torch.equal(nf4.dequantize_nf4(packed, st, out=out, **kw), expect)
                    t = bench(lambda: nf4.dequantize_nf4(packed, st, out=out, **kw))
                    res.append({**kw, "us": t * 1e6, "TBps": nbytes / t / 1e12, "exact": exact})
                except Exception as e:  # a config that does not compile is reported, not fatal
                    res.append({**kw, "error": repr(e)[:200]})
    return res


def loss_rows(N, V, H, chunks, frac_ignored=0.0):
    dev = "cuda" if CUDA else "cpu"
    dtype = torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    hidden = torch.randn(N, H, device=dev, dtype=dtype, generator=g)
    weight = (torch.randn(V, H, device=dev, generator=g) * 0.02).to(dtype)   # frozen, as in QLoRA
    labels = torch.randint(0, V, (N,), device=dev, generator=g)
    labels[torch.rand(N, device=dev, generator=g) < frac_ignored] = -100
    h = hidden.clone().requires_grad_()

    def run(fn):
        def step():
            h.grad = None
            fn().backward()
        return step

    variants = {"plain": lambda: lm_head_loss_reference(h, weight, labels)}
    for c in chunks:
        variants[f"chunked_{c}"] = (lambda c=c: lm_head_loss(h, weight, labels, chunk_size=c)[0])
    rows, ref_grad = [], None
    for name, fn in variants.items():
        step = run(fn)
        peak = None
        if CUDA:
            step()
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            step()
            torch.cuda.synchronize()
            peak = (torch.cuda.max_memory_allocated() - base) / 2**30
        t = bench(step)
        step()
        grad = h.grad.float()
        if ref_grad is None:
            ref_grad = grad
        rel = ((grad - ref_grad).norm() / ref_grad.norm()).item()
        rows.append({"variant": name, "N": N, "V": V, "H": H, "ms": t * 1e3, "peak_GiB": peak,
                     "grad_rel_vs_plain": rel})
    return rows


def ptx_stats():
    """Compile the dequant kernel for sm_90 here (no GPU needed) and count memory instructions."""
    import re
    from collections import Counter

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    out = []
    for half, vec in ((32, 4), (32, 16), (64, 4)):
        sig = {"packed_ptr": "*u8", "absmax_ptr": "*u8", "code_ptr": "*fp32", "absmax2_ptr": "*fp32",
               "code2_ptr": "*fp32", "offset_ptr": "*fp32", "out_ptr": "*bf16", "n_elements": "i32",
               "n_blocks": "i32"}
        consts = dict(HALF=half, BLOCKSIZE2=256, NB=4096 // half, NESTED=True, EVEN=True, INT64=False,
                      SOFT_BF16=False, VEC=vec)
        sig.update({k: "constexpr" for k in consts})
        src = ASTSource(fn=nf4._nf4_dequant_kernel, signature=sig, constexprs=consts,
                        attrs={(i,): [["tt.divisibility", 16]] for i in range(7)})
        ck = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8, "enable_fp_fusion": False})
        ops = Counter(re.findall(r"^\s*((?:ld|st|bar|fma|ldmatrix)[a-z0-9.]*)", ck.asm["ptx"], re.M))
        out.append({"blocksize": 2 * half, "vec": vec, **ops})
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ptx", action="store_true", help="print sm_90 PTX instruction counts and exit")
    ap.add_argument("--no-sweep", action="store_true")
    args = ap.parse_args()
    if args.ptx:
        for r in ptx_stats():
            print(r)
        return
    result = {"device": torch.cuda.get_device_name() if CUDA else "cpu", "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d")}
    if CUDA:
        shapes = [(4096, 4096), (4096, 14336), (14336, 4096), (128256, 4096)]
        loss_cfg = dict(N=8192, V=128256, H=4096, chunks=(1024, 2048, 4096))
    else:
        shapes = [(256, 512), (1024, 1024)]
        loss_cfg = dict(N=256, V=4096, H=128, chunks=(64, 256))

    print(f"== NF4 dequant (blocksize 64, double quant, bf16 out) on {result['device']}")
    rows = dequant_rows(shapes)
    if CUDA:
        rows += dequant_rows([(4096, 14336)], blocksize=128)
        rows += dequant_rows([(4096, 14336)], nested=False)
    print(f"{'shape':>14} {'bs':>4} {'dq':>3} {'exact':>5} {'ours us':>9} {'TB/s':>6} {'bnb us':>9} {'TB/s':>6}"
          f" {'copy TB/s':>9}")
    for r in rows:
        print(f"{'x'.join(map(str, r['shape'])):>14} {r['blocksize']:>4} {int(r['nested']):>3} "
              f"{str(r['exact_vs_bnb']):>5} {r['ours_us']:>9.1f} {r['ours_TBps']:>6.2f} {r['bnb_us']:>9.1f} "
              f"{r['bnb_TBps']:>6.2f} {r.get('copy_TBps', float('nan')):>9.2f}")
    result["dequant"] = rows
    if CUDA and not args.no_sweep:
        sweep = dequant_sweep()
        result["dequant_sweep_4096x14336"] = sweep
        ok = [s for s in sweep if "us" in s]
        for s in sorted(ok, key=lambda s: s["us"])[:6]:
            print("  sweep", s)
        for s in sweep:
            if "error" in s:
                print("  sweep error", s)

    print(f"== LM head + CE, bf16, N={loss_cfg['N']} V={loss_cfg['V']} H={loss_cfg['H']}, fwd+bwd (hidden grad)")
    lrows = loss_rows(**loss_cfg)
    for r in lrows:
        peak = f"{r['peak_GiB']:.2f} GiB" if r["peak_GiB"] is not None else "n/a"
        print(f"{r['variant']:>14} {r['ms']:>9.2f} ms  peak {peak:>10}  grad rel vs plain {r['grad_rel_vs_plain']:.2e}")
    result["lm_loss"] = lrows
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()

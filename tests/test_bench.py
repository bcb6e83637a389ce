"""`fourbit bench` / benchmarks/train_throughput.py at a tiny shape on CPU; shapes and FLOP counts."""
import json
import pytest
import torch

pytest.importorskip("bitsandbytes")

from fourbit.bench import main, make_ids  # noqa: E402
from fourbit.shapes import build_random_model, flops_per_token, shape_config  # noqa: E402


def test_flops_per_token_match_anchors():
    cfg = shape_config("llama3-8b")
    assert flops_per_token(cfg, 2048, 16, False) / 1e9 == pytest.approx(32.1, abs=0.05)
    assert flops_per_token(cfg, 2048, 16, True) / 1e9 == pytest.approx(46.7, abs=0.05)


def test_nf4_bits_equal_bitsandbytes_on_the_same_bf16_weights():
    import bitsandbytes.functional as bnbf
    q = build_random_model("tiny", "cpu", quant="nf4", seed=3)
    b = build_random_model("tiny", "cpu", quant="none", seed=3)
    for name in ("model.layers.0.self_attn.k_proj", "model.layers.1.mlp.down_proj"):
        w = b.get_submodule(name).weight
        packed, qs = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
        got = q.get_submodule(name).weight
        assert torch.equal(got.data, packed)
        assert torch.equal(got.quant_state.absmax, qs.absmax)
    assert torch.equal(q.model.embed_tokens.weight, b.model.embed_tokens.weight)


def test_seed_stack_rows():
    ids = make_ids(1024, 16, 4)
    assert torch.equal(ids, torch.randint(3, 1024, (4, 16), generator=torch.Generator().manual_seed(1)))


def test_bench_runs_on_cpu_and_losses_agree(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["--shape", "tiny", "--device", "cpu", "--seq", "32", "--bsz", "2", "--steps", "2", "--warm", "1",
                 "--runs", "off,offload,classic", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert [r["run"] for r in res] == ["off", "offload", "classic"]
    for r in res:
        assert r["tokens_per_s"] > 0 and len(r["losses"]) == 3
        assert set(r) >= {"tokens_per_s", "peak_alloc_gib", "peak_reserved_gib", "loss", "mfu"}
    # Same weights, rows and order: fourbit's losses equal the classic stack's within bf16 noise.
    assert res[0]["max_loss_diff_vs_ref"] < 2e-3
    assert res[0]["losses"] == res[1]["losses"]
    assert "| fourbit | off |" in capsys.readouterr().out


def test_gpu_gaps_reports_idle_time_and_the_launching_op(tmp_path):
    """The profile's idle-gap summary, on a hand-made chrome trace: two kernels 500 us apart."""
    import json
    from fourbit.bench import gpu_gaps
    ev = [{"cat": "kernel", "name": "gemm", "ts": 0, "dur": 100, "args": {"correlation": 1}},
          {"cat": "kernel", "name": "norm", "ts": 600, "dur": 10, "args": {"correlation": 2}},
          {"cat": "kernel", "name": "norm2", "ts": 612, "dur": 10, "args": {"correlation": 3}},
          {"cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": 590, "dur": 5, "args": {"correlation": 2}},
          {"cat": "cpu_op", "name": "Optimizer.step", "ts": 150, "dur": 500, "args": {}},
          {"cat": "cpu_op", "name": "aten::mul_", "ts": 585, "dur": 20, "args": {}}]
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"traceEvents": ev}))
    out = gpu_gaps(str(path))
    assert "idle in gaps > 20 us: 0.5 ms (1 gaps)" in out
    assert "gemm | norm | aten::mul_" in out


def test_bench_ablation_switches_keep_the_math(tmp_path):
    """The ablation switches (:nosplit :norope :noce :noloraorder :nogroup :nolowp :nosync :gcoff :sdpa=)
    only change how a step runs: on CPU every row gives the same losses, and the switches are
    restored afterwards."""
    from fourbit.switches import Switches
    out = tmp_path / "r.json"
    runs = "selective,selective:nosplit:noce:nolowp:noloraorder:nogroup,off:norope:nosync:gcoff:sdpa=math"
    assert main(["--shape", "tiny", "--device", "cpu", "--seq", "32", "--bsz", "2", "--steps", "2", "--warm", "1",
                 "--runs", runs, "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert [r["run"] for r in res] == runs.split(",")
    assert res[0]["losses"] == res[1]["losses"]
    # transformers' RoPE rounds three times in bf16, the fused one once; math SDPA: rounding too
    assert max(abs(a - b) for a, b in zip(res[0]["losses"], res[2]["losses"])) < 1e-3
    assert Switches.all_on()


def test_bench_refuses_an_unknown_run_suffix(capsys):
    with pytest.raises(SystemExit):
        main(["--shape", "tiny", "--device", "cpu", "--runs", "off:norpe"])
    assert "unknown suffix(es) ['norpe']" in capsys.readouterr().err


def test_bench_auto_row_takes_the_memory_plans_choice(tmp_path):
    """`--runs auto` resolves the policy with fourbit.plan on the row's shape and settings within
    --budget-gib (the one memory model `fourbit train` uses)."""
    from fourbit.config import load_config
    from fourbit.plan import CPU_ROOM, estimate
    from fourbit.plan_model import model_spec
    cfg = load_config(None, base={"model": "shape:tiny", "data": {"max_length": 64, "packing": False},
                                  "lora": {"r": 16, "alpha": 32, "dropout": 0.0},
                                  "train": {"micro_batch_size": 2, "device": "cpu"}})
    spec = model_spec(cfg.model)
    tot = {p: estimate(cfg, spec, "cpu", policy=p).total for p in ("off", "selective")}
    assert tot["selective"] < tot["off"]
    budget = (tot["off"] / CPU_ROOM["off"] + tot["selective"] / CPU_ROOM["selective"]) / 2 / 2 ** 30
    out = tmp_path / "r.json"
    for gib, want in ((64.0, "off"), (budget, "selective")):
        assert main(["--shape", "tiny", "--device", "cpu", "--seq", "64", "--bsz", "2", "--steps", "1", "--warm", "0",
                     "--runs", "auto", "--budget-gib", str(gib), "--json", str(out)]) == 0
        assert json.loads(out.read_text())[0]["policy"] == want


def test_bench_host_tail_times_each_phase(tmp_path):
    """--host-tail: 3 more steps after the timed ones, the host's milliseconds per phase of the step."""
    out = tmp_path / "r.json"
    assert main(["--shape", "tiny", "--device", "cpu", "--seq", "32", "--bsz", "2", "--steps", "1", "--warm", "0",
                 "--runs", "off", "--host-tail", "--json", str(out)]) == 0
    ms = json.loads(out.read_text())[0]["host_ms"]
    for phase in ("forward queued", "backward queued", "gather + clip queued", "host read (waits for the GPU)",
                  "optimizer step", "scheduler", "zero_grad", "between steps"):
        assert phase in ms and ms[phase] >= 0, phase
    assert ms["forward queued"] > ms["scheduler"]                  # a forward pass costs more than an lr update

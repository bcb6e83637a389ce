"""NF4 dequantization: torch reference == bitsandbytes, Triton kernel == reference, bit for bit.

The Triton test runs the kernel under the CPU interpreter (TRITON_INTERPRET=1) when there is no
GPU. The interpreter is chosen when a kernel is decorated, i.e. when fourbit.kernels.nf4 is first
imported; another test may have imported it earlier without the variable, so in that case the test
re-runs itself in a fresh interpreter process with the variable set.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

bnbf = pytest.importorskip("bitsandbytes.functional")

from fourbit.kernels import nf4  # noqa: E402
from fourbit.kernels.nf4 import NF4State, dequantize_nf4_fast, dequantize_nf4_reference  # noqa: E402

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# Rows hold whole blocks: the shapes real weights have; bitsandbytes' CPU kernel is right on these.
ALIGNED = ((64, 128), (96, 256), (7, 128), (130, 384), (1, 1024))
# Blocks straddle rows, a partial last block, an odd element count (a half-used last byte).
RAGGED = ((256, 192), (33, 130), (5, 13), (3, 1000), (1, 7))


def _quantize(shape, blocksize, nested, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    # A heavy-tailed spread of magnitudes so scales and codes cover their range.
    w = (torch.randn(shape, generator=g) * torch.rand(shape, generator=g).pow(3) * 4).to(dtype)
    packed, qs = bnbf.quantize_4bit(w, blocksize=blocksize, compress_statistics=nested, quant_type="nf4")
    return w, packed, qs


def _bnb_default_dequant(packed, qs):
    """bitsandbytes' own pure-torch 4-bit dequantization (its 'default' backend), uncompiled."""
    from bitsandbytes.backends.default import ops
    fn = getattr(ops._dequantize_4bit_compute, "__wrapped__", ops._dequantize_4bit_compute)
    absmax = bnbf.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset if qs.nested else qs.absmax
    return fn(packed.reshape(-1), absmax.float(), qs.code, qs.blocksize, qs.shape, qs.dtype)


@pytest.mark.parametrize("blocksize", (64, 128))
@pytest.mark.parametrize("nested", (False, True))
def test_reference_bit_identical_to_bitsandbytes(blocksize, nested):
    """bf16 / fp32 against bitsandbytes' public CPU path. Its fp16 CPU output depends on the CPU
    (on the H200 host's CPU it was an ulp off its CUDA kernel for some values, 2026-11-28), so fp16
    is checked against bitsandbytes' pure-torch implementation here and against CUDA on the GPU."""
    for shape in ALIGNED:
        for dtype in DTYPES:
            _, packed, qs = _quantize(shape, blocksize, nested, dtype)
            ref = dequantize_nf4_reference(packed, qs)
            assert ref.dtype == dtype and ref.shape == shape
            expect = _bnb_default_dequant(packed, qs) if dtype == torch.float16 else bnbf.dequantize_4bit(packed, qs)
            assert torch.equal(ref, expect), (shape, dtype)


def test_packing_order_high_nibble_first():
    """Element 2i is the high nibble of byte i: a hand-built weight pins the layout down."""
    _, packed, qs = _quantize((1, 64), 64, False, torch.float32)
    qs.absmax = torch.ones_like(qs.absmax)
    packed = torch.zeros_like(packed)
    packed.view(-1)[0] = 0xF0     # element 0 -> code 15 (+1.0), element 1 -> code 0 (-1.0)
    out = dequantize_nf4_reference(packed, qs).view(-1)
    assert out[0].item() == 1.0 and out[1].item() == -1.0
    assert torch.equal(out, bnbf.dequantize_4bit(packed, qs).view(-1))


@pytest.mark.parametrize("nested", (False, True))
def test_reference_on_ragged_shapes_roundtrips(nested):
    """Where bitsandbytes' CPU kernel disagrees with its own quantizer (blocks straddling rows), the
    reference must still invert the quantizer: |W - w| <= half the widest NF4 gap, (1 - 0.6962) / 2
    = 0.1519, times the block scale. Double quant rounds the scale itself (8 bits), which moves a
    value by up to a few more thousandths of the scale: measured 0.1593 on these seeds, bound 0.165."""
    bound = 0.165 if nested else 0.152
    for shape in RAGGED:
        w, packed, qs = _quantize(shape, 128, nested, torch.float32)
        ref = dequantize_nf4_reference(packed, qs).view(-1)
        n = w.numel()
        scale = nf4.decode_absmax_reference(NF4State.from_quant_state(qs)).repeat_interleave(128)[:n]
        assert ((ref - w.view(-1)).abs() <= bound * scale).all(), shape


def test_fast_path_cpu_matches_reference():
    for shape, dtype in [(s, d) for s in ALIGNED + RAGGED for d in DTYPES]:
        _, packed, qs = _quantize(shape, 64, True, dtype)
        ref = dequantize_nf4_reference(packed, qs)
        assert torch.equal(dequantize_nf4_fast(packed, qs), ref), (shape, dtype)
        out = torch.empty_like(ref)
        assert dequantize_nf4_fast(packed, NF4State.from_quant_state(qs), out=out) is out
        assert torch.equal(out, ref)


def _triton_runs_here() -> bool:
    return torch.cuda.is_available() or nf4._INTERPRET


def test_triton_kernel_matches_reference():
    pytest.importorskip("triton")
    if not _triton_runs_here():
        if os.environ.get("TRITON_INTERPRET") == "1":
            pytest.fail("TRITON_INTERPRET=1 is set but the kernel was not decorated in interpreter mode")
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        root = Path(__file__).resolve().parent.parent
        res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                              f"{__file__}::test_triton_kernel_matches_reference"],
                             cwd=root, env=env, capture_output=True, text=True, timeout=900)
        assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
        return
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for shape in ALIGNED + RAGGED:
        for blocksize in (64, 128):
            for nested in (False, True):
                for dtype in DTYPES:
                    _, packed, qs = _quantize(shape, blocksize, nested, dtype)
                    ref = dequantize_nf4_reference(packed, qs)
                    qs.to(device)
                    got = nf4.dequantize_nf4(packed.to(device), qs)
                    assert torch.equal(got.cpu(), ref), (shape, blocksize, nested, dtype)
    # The holder, a preallocated output, and a small program size that forces many programs.
    _, packed, qs = _quantize((64, 512), 64, True, torch.bfloat16)
    ref = dequantize_nf4_reference(packed, qs)
    qs.to(device)
    st = NF4State.from_quant_state(qs)
    out = torch.empty(ref.shape, dtype=ref.dtype, device=device)
    got = nf4.dequantize_nf4(packed.to(device), st, out=out, bytes_per_program=64, num_warps=1)
    assert got is out and torch.equal(out.cpu(), ref)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("shape", ((4096, 4096), (1024, 14336), (4000, 96)))
@pytest.mark.parametrize("blocksize", (64, 128))
@pytest.mark.parametrize("nested", (False, True))
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
def test_triton_bit_identical_to_bitsandbytes_cuda(shape, blocksize, nested, dtype):
    w = torch.randn(shape, device="cuda", dtype=dtype)
    packed, qs = bnbf.quantize_4bit(w, blocksize=blocksize, compress_statistics=nested, quant_type="nf4")
    expect = bnbf.dequantize_4bit(packed, qs)
    assert torch.equal(nf4.dequantize_nf4(packed, qs), expect)
    assert torch.equal(dequantize_nf4_reference(packed, qs), expect)

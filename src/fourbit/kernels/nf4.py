"""NF4 (+ double-quant) dequantization: a pure-torch reference and a Triton kernel, bit-identical.

Why our own kernel instead of `bitsandbytes.functional.dequantize_4bit`: bitsandbytes decodes the
double-quantized block scales in a separate pass (an extra fp32 tensor written and read back) and
its kernel reaches 10-45% of the copy bandwidth on an H200. The QLoRA forward and backward
dequantize every frozen weight on every step, so this is on the critical path.

The format (bitsandbytes' `QuantState`, quant_type "nf4"):

    W (numel n, flattened row-major) is split into blocks of `blocksize` values (64 by default).
    packed[i] (uint8) holds two 4-bit codes: element 2i in the HIGH nibble, element 2i+1 in the LOW.
    code (16,) fp32 are the NF4 values, absmax[b] the per-block scale.
    Double quant ("nested"): absmax is uint8, decoded with a second 8-bit blockwise state over
    blocks of 256 scales:  absmax_f[b] = code2[absmax[b]] * absmax2[b // 256] + offset

    W[j] = dtype( code[nibble(j)] * absmax_f[j // blocksize] )

Bit-exactness depends on the order of float ops, which we copy from bitsandbytes (CPU and CUDA):
the scale is an fp32 multiply followed by a separate fp32 add (no fused multiply-add: the kernel is
compiled with `enable_fp_fusion=False`), the value is one fp32 multiply, then one round-to-nearest-
even cast to the output dtype.
"""
from __future__ import annotations

from dataclasses import dataclass
from math import prod

import torch

try:  # Triton is optional: CPU-only installs use the reference (or bitsandbytes' CPU kernel).
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on installs without triton
    triton = None


# ----------------------------------------------------------------------------------------------
# The holder: tensors the kernel reads, derived once from a bitsandbytes QuantState.
# ----------------------------------------------------------------------------------------------
@dataclass
class NF4State:
    """The parts of a bitsandbytes NF4 `QuantState` the kernel needs, flat and contiguous.

    Build it once per weight with `NF4State.from_quant_state(qs)` and keep it next to the weight
    (e.g. on the LoRA layer) so each dequantization skips the conversion.
    """
    code: torch.Tensor             # (16,) fp32 NF4 values
    absmax: torch.Tensor           # (n_blocks,) uint8 when nested, else fp32
    absmax2: torch.Tensor | None   # (ceil(n_blocks / blocksize2),) fp32, nested only
    code2: torch.Tensor | None     # (256,) fp32 8-bit dynamic code, nested only
    offset: torch.Tensor | None    # (1,) fp32 mean removed before the scales were quantized, nested only
    blocksize: int
    blocksize2: int
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nested(self) -> bool:
        return self.absmax2 is not None

    @property
    def numel(self) -> int:
        return prod(self.shape)

    @classmethod
    def from_quant_state(cls, qs) -> "NF4State":
        """Args: qs: a `bitsandbytes.functional.QuantState` with quant_type 'nf4'."""
        if qs.quant_type != "nf4":
            raise ValueError(f"only NF4 is supported, got quant_type={qs.quant_type!r}")
        if qs.dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise ValueError(f"unsupported output dtype {qs.dtype}")
        dev = qs.absmax.device
        if qs.nested:
            off = qs.offset if torch.is_tensor(qs.offset) else torch.tensor(float(qs.offset))
            return cls(code=qs.code.to(dev, torch.float32).contiguous(), absmax=qs.absmax.reshape(-1).contiguous(),
                       absmax2=qs.state2.absmax.to(torch.float32).reshape(-1).contiguous(),
                       code2=qs.state2.code.to(dev, torch.float32).contiguous(),
                       offset=off.to(dev, torch.float32).reshape(1), blocksize=int(qs.blocksize),
                       blocksize2=int(qs.state2.blocksize), shape=tuple(qs.shape), dtype=qs.dtype)
        return cls(code=qs.code.to(dev, torch.float32).contiguous(),
                   absmax=qs.absmax.to(torch.float32).reshape(-1).contiguous(), absmax2=None, code2=None,
                   offset=None, blocksize=int(qs.blocksize), blocksize2=0, shape=tuple(qs.shape), dtype=qs.dtype)


def _as_state(quant_state) -> NF4State:
    return quant_state if isinstance(quant_state, NF4State) else NF4State.from_quant_state(quant_state)


def _flat_bytes(packed: torch.Tensor) -> torch.Tensor:
    """(n_bytes,) uint8 view of the packed weight, whatever its storage dtype (bnb's quant_storage)."""
    flat = packed.reshape(-1)
    return flat if flat.dtype == torch.uint8 else flat.view(torch.uint8)


# ----------------------------------------------------------------------------------------------
# Reference: plain torch, written for reading. Bit-identical to bitsandbytes' dequantize_4bit.
# ----------------------------------------------------------------------------------------------
def decode_absmax_reference(st: NF4State) -> torch.Tensor:
    """(n_blocks,) fp32 block scales: absmax_f = code2[q] * absmax2[b // 256] + offset (nested)."""
    if not st.nested:
        return st.absmax.float()
    n_blocks = st.absmax.numel()
    scale2 = st.absmax2.repeat_interleave(st.blocksize2)[:n_blocks]   # (n_blocks,) per-scale fp32 scale
    decoded = st.code2[st.absmax.long()] * scale2                      # fp32 multiply, rounded
    return decoded + st.offset                                          # then a separate fp32 add


def dequantize_nf4_reference(packed: torch.Tensor, quant_state) -> torch.Tensor:
    """Pure-torch NF4 dequantization. Returns a tensor of `quant_state.shape` and `.dtype`.

    Args:
        packed: uint8 (or any quant_storage dtype) tensor holding ceil(n / 2) bytes.
        quant_state: a bitsandbytes QuantState (nf4) or an `NF4State`.
    """
    st = _as_state(quant_state)
    n = st.numel
    p = _flat_bytes(packed)                                      # (n_bytes,)
    codes = torch.stack([p >> 4, p & 0xF], dim=-1).reshape(-1)[:n]  # (n,) high nibble first
    values = st.code[codes.long()]                               # (n,) fp32
    scale = decode_absmax_reference(st).repeat_interleave(st.blocksize)[:n]  # (n,) fp32
    return (values * scale).to(st.dtype).reshape(st.shape)


# ----------------------------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _bf16_rne(x):
        """fp32 -> bf16 round-to-nearest-even on the bits: (u + 0x7FFF + lsb) >> 16 (finite x)."""
        u = x.to(tl.uint32, bitcast=True)
        r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        return r.to(tl.uint16).to(tl.bfloat16, bitcast=True)

    @triton.jit
    def _nf4_dequant_kernel(
        packed_ptr,    # (n_bytes,) uint8
        absmax_ptr,    # (n_blocks,) uint8 (nested) or fp32
        code_ptr,      # (16,) fp32
        absmax2_ptr,   # (n_blocks2,) fp32 (nested only)
        code2_ptr,     # (256,) fp32 (nested only)
        offset_ptr,    # (1,) fp32 (nested only)
        out_ptr,       # (n,) output dtype
        n_elements,
        n_blocks,
        HALF: tl.constexpr,          # blocksize // 2 = packed bytes per quant block
        BLOCKSIZE2: tl.constexpr,    # quant blocks per second-level scale (256)
        NB: tl.constexpr,            # quant blocks per program
        NESTED: tl.constexpr,
        EVEN: tl.constexpr,          # n_elements == n_blocks * blocksize and n_blocks % NB == 0: no masks
        INT64: tl.constexpr,         # offsets may pass 2**31
        SOFT_BF16: tl.constexpr,     # round fp32 -> bf16 with integer ops (the interpreter's cast truncates)
        VEC: tl.constexpr,           # packed bytes per thread per load (4: see below)
    ):
        """out[j] = cast(code[nib(j)] * s[j // blocksize]), s = code2[q] * absmax2[b // 256] + offset.

        One program decodes NB whole quant blocks: a (NB, HALF) tile of bytes is loaded with
        16-byte vector loads, both nibbles are looked up in the 16-entry code table (an L1-resident
        gather), scaled by the block's scale decoded in-register, interleaved (high nibble first)
        into an (NB, 2*HALF) tile and stored in the output dtype.

        Layout: with VEC=4 a thread loads 4 packed bytes (one 32-bit load; a warp still reads 128
        contiguous bytes) and stores the 8 bf16 they expand to as one 16-byte store, so load and
        store share one register layout. Letting the compiler use 16-byte loads (VEC=16) makes the
        store layout differ and Triton converts through shared memory (7 barriers per program in the
        sm_90 PTX); the 4-byte loads are only 1/5 of the bytes moved.
        """
        pid = tl.program_id(0)
        if INT64:
            pid = pid.to(tl.int64)
        blk = pid * NB + tl.arange(0, NB)                                  # (NB,) quant block ids
        col = tl.arange(0, HALF)
        col = (col // VEC) * VEC + col % VEC          # same values; the compiler proves contiguity VEC
        col2 = tl.arange(0, 2 * HALF)
        col2 = (col2 // (2 * VEC)) * (2 * VEC) + col2 % (2 * VEC)
        byte_offs = blk[:, None] * HALF + col[None, :]                      # (NB, HALF)
        out_offs = blk[:, None] * (2 * HALF) + col2[None, :]                # (NB, 2*HALF)

        if EVEN:
            q = tl.load(absmax_ptr + blk)
            p = tl.load(packed_ptr + byte_offs)
        else:
            blk_ok = blk < n_blocks
            q = tl.load(absmax_ptr + blk, mask=blk_ok, other=0)
            p = tl.load(packed_ptr + byte_offs, mask=byte_offs * 2 < n_elements, other=0)

        if NESTED:
            s = tl.load(code2_ptr + q.to(tl.int32)) * tl.load(absmax2_ptr + blk // BLOCKSIZE2)
            s = s + tl.load(offset_ptr)                                     # separate add: no FMA
        else:
            s = q                                                           # (NB,) fp32 already
        s = s[:, None]                                                      # (NB, 1)

        hi = tl.load(code_ptr + (p >> 4).to(tl.int32)) * s                  # (NB, HALF) fp32
        lo = tl.load(code_ptr + (p & 0xF).to(tl.int32)) * s
        out_ty = out_ptr.dtype.element_ty
        if SOFT_BF16:
            hi = _bf16_rne(hi)
            lo = _bf16_rne(lo)
        w = tl.reshape(tl.join(hi.to(out_ty), lo.to(out_ty)), (NB, 2 * HALF))  # (NB, 2*HALF) interleaved

        if EVEN:
            tl.store(out_ptr + out_offs, w)
        else:
            tl.store(out_ptr + out_offs, w, mask=out_offs < n_elements)


from . import interpreting as _interpreting   # noqa: E402  (shared by the kernels)


# Decided once at import (a constant, not mutable state): the kernel object tells which mode it is in.
_INTERPRET = triton is not None and _interpreting(_nf4_dequant_kernel)

# Default launch shape: 4 KiB of packed bytes (8192 outputs) per program, 4 warps, 4-byte loads:
# each thread handles 32 bytes and stores 64 values. Chosen from the H200 sweep in kernels_bench.py
# (4096x14336, 2026-11-28): 42.0 us = 3.51 TB/s effective, vs 48.7 us with 8 warps; the best point,
# 2 KiB / 4 warps / 16-byte loads, was within 0.6% (41.8 us).
DEFAULT_BYTES_PER_PROGRAM = 4096
DEFAULT_NUM_WARPS = 4
DEFAULT_VEC = 4


def dequantize_nf4(packed: torch.Tensor, quant_state, out: torch.Tensor | None = None, *,
                   bytes_per_program: int = DEFAULT_BYTES_PER_PROGRAM,
                   num_warps: int = DEFAULT_NUM_WARPS, vec: int = DEFAULT_VEC) -> torch.Tensor:
    """Triton NF4 dequantization, bit-identical to `dequantize_nf4_reference`.

    Args:
        packed: the packed 4-bit weight (any shape, uint8 or other quant_storage), contiguous.
        quant_state: bitsandbytes QuantState (nf4) or, cheaper per call, an `NF4State`.
        out: optional preallocated output of `quant_state.shape` and `.dtype` (contiguous).
        bytes_per_program, num_warps, vec: launch shape (tuning knobs; vec divides blocksize // 2).
    Returns:
        (*quant_state.shape) tensor in quant_state.dtype.
    """
    if triton is None:
        raise RuntimeError("dequantize_nf4 needs triton; use dequantize_nf4_fast for a fallback")
    st = _as_state(quant_state)
    p = _flat_bytes(packed)
    n = st.numel
    if p.numel() != (n + 1) // 2:
        raise ValueError(f"packed has {p.numel()} bytes, shape {st.shape} needs {(n + 1) // 2}")
    if out is None:
        out = torch.empty(st.shape, dtype=st.dtype, device=p.device)
    elif out.dtype != st.dtype or out.numel() != n or not out.is_contiguous():
        raise ValueError("out must be contiguous with the quant state's dtype and numel")
    n_blocks = st.absmax.numel()
    half = st.blocksize // 2
    nb = max(1, bytes_per_program // half)
    nb = min(nb, triton.next_power_of_2(n_blocks))  # tiny weights: one small program
    even = n == n_blocks * st.blocksize and n_blocks % nb == 0
    dummy = st.absmax  # unused pointers when not nested: any tensor on the device will do
    grid = (triton.cdiv(n_blocks, nb),)
    _nf4_dequant_kernel[grid](
        p, st.absmax, st.code,
        st.absmax2 if st.nested else dummy, st.code2 if st.nested else dummy,
        st.offset if st.nested else dummy, out,
        n, n_blocks,
        HALF=half, BLOCKSIZE2=max(st.blocksize2, 1), NB=nb, NESTED=st.nested, EVEN=even,
        INT64=n + 2 * st.blocksize * nb >= 2**31,
        SOFT_BF16=st.dtype == torch.bfloat16 and _INTERPRET, VEC=min(vec, half),
        num_warps=num_warps, enable_fp_fusion=False,
    )
    return out


def dequantize_nf4_fast(packed: torch.Tensor, quant_state, out: torch.Tensor | None = None) -> torch.Tensor:
    """The fastest bit-identical dequantization for the device: Triton on CUDA, else bitsandbytes.

    On CPU bitsandbytes' C++ kernel is 5-12x faster than the torch reference (measured at 2048x2048,
    see kernels_bench.py) and gives the same bits for bf16 and fp32 outputs when each row holds
    whole blocks. Its fp16 output depends on the CPU (an ulp off bitsandbytes' CUDA kernel and our
    reference on one AVX-512 machine, equal on another), and it disagrees with bitsandbytes' own
    quantizer when a block straddles two rows (e.g. 192 columns, blocksize 128): those cases, and
    callers holding only an `NF4State`, take the reference.
    """
    if packed.is_cuda and triton is not None:
        return dequantize_nf4(packed, quant_state, out)
    if (not isinstance(quant_state, NF4State) and quant_state.dtype in (torch.bfloat16, torch.float32)
            and quant_state.shape[-1] % quant_state.blocksize == 0):
        try:
            import bitsandbytes.functional as bnbf
        except ImportError:
            bnbf = None
        if bnbf is not None:
            return bnbf.dequantize_4bit(packed, quant_state, out=out)
    res = dequantize_nf4_reference(packed, quant_state)
    if out is not None:
        out.copy_(res.reshape(out.shape))
        return out
    return res

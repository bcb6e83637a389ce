"""Switches that each undo one fast-path change, for the benchmark's ablation rows.

`fourbit train` runs with every switch on; `fourbit bench --runs off:norope,...` turns one off for a
row so that its cost is measured against the same weights and data in the same process
(benchmarks/NOTES.md). Every switch keeps the math: the tests run rows with and without each one.
"""
from __future__ import annotations

from contextlib import contextmanager


class Switches:
    group = True          # q/k/v and gate/up as one dequant buffer + one GEMM (`lora.LoRAGroup`)      :nogroup
    split = True          # selective/offload recompute branch by branch (`train.activations`)          :nosplit
    rope = True           # fused RoPE attention forward (`train.activations._rope_attention_forward`)  :norope
    ce_kernel = True      # the LM-head cross-entropy Triton kernel (`kernels.lm_loss`)                 :noce
    lora_first = True     # LoRA product written first, the base GEMM accumulates onto it (`kernels.lora_fn`) :noloraorder
    opt_async = True      # paged AdamW without bitsandbytes' per-step device syncs (`train.optim`)         :nooptasync
    wgrad_f32 = True      # LoRA weight gradients written in fp32 by their GEMM, no cast kernel (`kernels.lora_fn`) :nowgradf32
    add_norm = True       # off/keep: mid-layer residual add + RMSNorm as one kernel (`kernels.rmsnorm`)    :noaddnorm

    # bench run suffix -> the switch it turns off
    SUFFIXES = {"nogroup": "group", "nosplit": "split", "norope": "rope", "noce": "ce_kernel",
                "noloraorder": "lora_first", "nooptasync": "opt_async",
                "nowgradf32": "wgrad_f32", "noaddnorm": "add_norm"}
    NAMES = tuple(SUFFIXES.values())

    @classmethod
    @contextmanager
    def set(cls, **values: bool):
        """Set some switches for a block; all are back on afterwards, even on error."""
        unknown = set(values) - set(cls.NAMES)
        if unknown:
            raise ValueError(f"unknown switch(es) {sorted(unknown)}; known: {cls.NAMES}")
        try:
            for k, v in values.items():
                setattr(cls, k, bool(v))
            yield cls
        finally:
            for k in cls.NAMES:
                setattr(cls, k, True)

    @classmethod
    def all_on(cls) -> bool:
        return all(getattr(cls, k) for k in cls.NAMES)

"""GPU fast paths (Triton), each with a pure-torch reference beside it.

- `fourbit.kernels.nf4`: NF4 + double-quant dequantization, bit-identical to bitsandbytes.
- `fourbit.kernels.lm_loss`: LM head + cross-entropy in token chunks, no (N, V) fp32 logits.
- `fourbit.kernels.lora_fn`: one autograd node per LoRA linear (or q/k/v, gate/up group) over NF4.
- `fourbit.kernels.rmsnorm`, `swiglu`, `rope`: fused frozen-weight RMSNorm, SwiGLU, and RoPE on the
  grouped q/k/v output.
"""


def interpreting(fn) -> bool:
    """True when the Triton kernel `fn` was decorated under TRITON_INTERPRET=1 (the CPU interpreter)."""
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover
        return False
    return isinstance(fn, InterpretedFunction)

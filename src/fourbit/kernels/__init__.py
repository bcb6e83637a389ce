"""GPU fast paths (Triton), each with a pure-torch reference beside it.

- `fourbit.kernels.nf4`: NF4 + double-quant dequantization, bit-identical to bitsandbytes.
- `fourbit.kernels.lm_loss`: LM head + cross-entropy in token chunks, no (N, V) fp32 logits.
"""

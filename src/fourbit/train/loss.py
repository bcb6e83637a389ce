"""Causal-LM loss from the decoder's hidden states and the output embedding.

Computing the loss ourselves (instead of calling the model with labels) lets us (1) keep only the
positions that carry a label before the LM head, so prompt tokens cost no vocabulary matmul, and
(2) return the *sum* over trainable tokens, so gradient accumulation divides by the token count of
the whole accumulated batch rather than averaging per micro-batch.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

IGNORE = -100


def decoder_inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k != "labels"}


def causal_lm_loss(model: nn.Module, batch: dict, chunk: int = 0) -> tuple[torch.Tensor, int]:
    """(sum of next-token CE over trainable tokens, number of trainable tokens) for one micro-batch.

    One host sync (the positions that carry a label, taken before the decoder runs, so the GPU is
    not left waiting mid-step); the hidden states are never gathered into a copy: the LM-head loss
    reads the trainable rows of the decoder output in place.
    chunk: tokens per LM-head chunk; 0 = `kernels.lm_loss.chunk_tokens` (512 MiB of chunk buffers;
        sized for the CUDA kernel's 2V bytes a token under off / keep, for 8V otherwise).
    """
    labels = batch["labels"][:, 1:]                                   # (B, T-1): token t+1 is predicted at t
    T = batch["labels"].shape[1]
    pos = (labels != IGNORE).nonzero()                                # (M, 2) (b, t): the one sync
    n = pos.shape[0]
    rows = pos[:, 0] * T + pos[:, 1]                                  # (M,) rows of the (B*T, H) output
    targets = labels[pos[:, 0], pos[:, 1]]                            # (M,)
    out = model.get_decoder()(**decoder_inputs(batch), use_cache=False)
    hidden = out.last_hidden_state                                    # (B, T, H)
    if n == 0:
        return hidden.sum() * 0.0, 0                                  # keeps the graph; callers skip the step
    head = model.get_output_embeddings()
    if head.bias is not None or getattr(model.config, "final_logit_softcapping", None):
        h = hidden[:, :-1][labels != IGNORE]                          # (N, H) only trainable positions
        logits = model.lm_head(h).float() if not getattr(model.config, "final_logit_softcapping", None) else \
            _softcapped(model, h)
        return F.cross_entropy(logits, labels[labels != IGNORE], reduction="sum"), n
    from ..kernels.lm_loss import _use_kernel, chunk_tokens, lm_head_loss_rows
    flat = hidden.reshape(-1, hidden.shape[-1])                       # (B*T, H), a view
    # the CUDA kernel holds 2V bytes a token: 4x the tokens in the same budget, unless the
    # checkpointing policy recomputes to save memory (`train.activations.apply_checkpointing` marks it)
    wide = _use_kernel(flat) and not model.__dict__.get("_fourbit_recompute", False)
    chunk = chunk or chunk_tokens(head.weight.shape[0], kernel=wide)
    return lm_head_loss_rows(flat, head.weight, rows, targets, chunk), n


def _softcapped(model: nn.Module, h: torch.Tensor) -> torch.Tensor:
    cap = model.config.final_logit_softcapping
    logits = model.get_output_embeddings()(h).float()
    return torch.tanh(logits / cap) * cap

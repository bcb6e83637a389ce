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


def chunked_ce_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """sum_i CE(hidden_i @ weight^T, labels_i), computed over row chunks; fp32 logits exist one chunk at a time."""
    from ..kernels.lm_loss import lm_head_loss
    loss, _ = lm_head_loss(hidden, weight, labels, chunk_size=chunk, reduction="sum")
    return loss


def decoder_inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k != "labels"}


def causal_lm_loss(model: nn.Module, batch: dict) -> tuple[torch.Tensor, int]:
    """(sum of next-token CE over trainable tokens, number of trainable tokens) for one micro-batch."""
    labels = batch["labels"][:, 1:]                                   # (B, T-1): token t+1 is predicted at t
    sel = labels != IGNORE
    n = int(sel.sum())
    out = model.get_decoder()(**decoder_inputs(batch), use_cache=False)
    hidden = out.last_hidden_state[:, :-1]                            # (B, T-1, H)
    if n == 0:
        return hidden.sum() * 0.0, 0                                  # keeps the graph; callers skip the step
    head = model.get_output_embeddings()
    h = hidden[sel]                                                    # (N, H) only trainable positions
    if head.bias is not None or getattr(model.config, "final_logit_softcapping", None):
        logits = model.lm_head(h).float() if not getattr(model.config, "final_logit_softcapping", None) else \
            _softcapped(model, h)
        return F.cross_entropy(logits, labels[sel], reduction="sum"), n
    return chunked_ce_sum(h, head.weight, labels[sel]), n


def _softcapped(model: nn.Module, h: torch.Tensor) -> torch.Tensor:
    cap = model.config.final_logit_softcapping
    logits = model.get_output_embeddings()(h).float()
    return torch.tanh(logits / cap) * cap

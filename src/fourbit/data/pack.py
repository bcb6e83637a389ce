"""Best-fit packing of whole examples into rows, and the collate function that builds model inputs.

Packed rows carry position_ids that restart at 0 for every example and no 2D attention_mask.
We checked transformers' masking code (masking_utils, 5.17 and 5.24) rather than assume it:
  * sdpa / eager / flex: `_preprocess_mask_arguments` calls `find_packed_sequence_indices(position_ids)`
    only when `attention_mask is None` *and* there is no cache; a new sequence starts wherever the
    position does not grow by exactly 1, per batch row (so batch > 1 works), and the block-diagonal
    causal mask is built from it (5.24 also remaps causality onto the positions; both agree here).
    So a packed batch must not carry a 2D mask, and the decoder must run with `use_cache=False`
    (otherwise an empty DynamicCache is created and packing is silently ignored).
  * flash attention: `_is_packed_sequence` only recognises packing when batch size is 1, so for
    flash we flatten all packed rows into a single (1, N) row (`attn_implementation` argument).
Padding at the end of a packed row gets positions 0, 1, ... so it forms its own segment: it attends
only to itself and never to real tokens. The first token of each packed example has label -100,
so no example is trained to predict its first token from the end of the previous one.
A test compares packed and unpacked logits per example on a tiny Llama (sdpa and eager).
"""
from __future__ import annotations

import bisect
import random
from typing import Optional

import torch

from .report import Example

IGNORE = -100


def pack_examples(examples: list[Example], max_length: int) -> list[list[int]]:
    """Group example indices into rows of at most `max_length` tokens (best-fit decreasing).

    Each example goes, longest first, into the open row with the least room that still fits it,
    which leaves few, small gaps. Returns the groups, each sorted by index, in a deterministic order.
    """
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i].input_ids), i))
    rooms: list[tuple[int, int]] = []        # (room left, row index), kept sorted
    groups: list[list[int]] = []
    for i in order:
        n = len(examples[i].input_ids)
        k = bisect.bisect_left(rooms, (n, -1))
        if k < len(rooms):
            room, row = rooms.pop(k)
            groups[row].append(i)
            bisect.insort(rooms, (room - n, row))
        else:
            groups.append([i])
            if max_length - n > 0:
                bisect.insort(rooms, (max_length - n, len(groups) - 1))
    return [sorted(g) for g in groups]


def collate(examples: list[Example], pad_id: int, packed_groups: Optional[list[list[int]]] = None,
            max_length: Optional[int] = None, attn_implementation: Optional[str] = None) -> dict[str, torch.Tensor]:
    """Tensors for one micro-batch.

    Args:
        examples: the rows (unpacked), or the whole example list that `packed_groups` indexes into.
        pad_id: token id used for padding (padding is masked by position, never by this id).
        packed_groups: one list of example indices per packed row, or None for one example per row.
        max_length: pad every row to this length (static shapes); None pads to the longest row.
        attn_implementation: with a flash-attention implementation, packed rows are flattened to one row.
    Returns:
        input_ids (B, T) long, labels (B, T) long (-100 on padding and untrained tokens),
        position_ids (B, T) long; and attention_mask (B, T) long for unpacked batches only (packed
        batches get their block-diagonal causal mask from position_ids inside transformers).
    """
    pad_id = 0 if pad_id is None else pad_id
    packed = packed_groups is not None
    groups = packed_groups if packed else [[i] for i in range(len(examples))]
    rows_ids, rows_lab, rows_pos = [], [], []
    for g in groups:
        ids, lab, pos = [], [], []
        for i in g:
            e = examples[i]
            ids += e.input_ids
            lab += [IGNORE] + list(e.labels[1:])         # never predict an example from the one before it
            pos += range(len(e.input_ids))
        rows_ids.append(ids)
        rows_lab.append(lab)
        rows_pos.append(pos)
    if packed and attn_implementation and "flash" in attn_implementation:
        rows_ids, rows_lab, rows_pos = ([sum(r, [])] for r in (rows_ids, rows_lab, rows_pos))
        max_length = None
    longest = max(len(r) for r in rows_ids)
    if max_length is not None and longest > max_length:
        raise ValueError(f"a row has {longest} tokens, more than max_length {max_length}")
    T = longest if max_length is None else max_length
    B = len(rows_ids)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)      # (B, T)
    labels = torch.full((B, T), IGNORE, dtype=torch.long)        # (B, T)
    position_ids = torch.arange(T).repeat(B, 1)                   # (B, T); padding: 0, 1, ... of its own
    attention_mask = torch.zeros((B, T), dtype=torch.long)        # (B, T)
    for b, (ids, lab, pos) in enumerate(zip(rows_ids, rows_lab, rows_pos)):
        n = len(ids)
        input_ids[b, :n] = torch.tensor(ids, dtype=torch.long)
        labels[b, :n] = torch.tensor(lab, dtype=torch.long)
        position_ids[b, :n] = torch.tensor(pos, dtype=torch.long)
        position_ids[b, n:] = torch.arange(T - n)
        attention_mask[b, :n] = 1
    batch = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
    if not packed:
        batch["attention_mask"] = attention_mask
    return batch


def padding_stats(lengths: list[int], max_length: int, batch_size: int, groups: Optional[list[list[int]]] = None,
                  seed: int = 0) -> dict[str, float]:
    """Share of token slots that are padding, unpacked vs packed, for shuffled micro-batches.

    Unpacked batches are padded to their longest example; packed rows are padded to max_length (as
    the trainer does). Returns rows and padding fraction for both and the padding fraction avoided.
    """
    rng = random.Random(seed)
    idx = list(range(len(lengths)))
    rng.shuffle(idx)
    real = sum(lengths)
    slots = sum(max(lengths[i] for i in idx[k:k + batch_size]) * len(idx[k:k + batch_size])
                for k in range(0, len(idx), batch_size))
    out = {"tokens": real, "rows_unpacked": len(lengths),
           "pad_fraction_unpacked": 1 - real / slots if slots else 0.0}
    if groups is not None:
        packed_slots = len(groups) * max_length
        out.update(rows_packed=len(groups), pad_fraction_packed=1 - real / packed_slots if packed_slots else 0.0)
        out["pad_fraction_avoided"] = out["pad_fraction_unpacked"] - out["pad_fraction_packed"]
        out["slots_saved"] = 1 - packed_slots / slots if slots else 0.0
    return out

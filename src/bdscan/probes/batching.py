"""Padding token sequences into a batch (right or left): the one pad/collate helper."""

from __future__ import annotations

from typing import Any, Sequence

import torch


def pad_id(tokenizer: Any) -> int:
    """The padding id; 0 for a tokenizer without one (padded positions are masked anyway)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def pad_right(seqs: Sequence[Sequence[int]], fill: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, attention_mask)`` of shape ``[len(seqs), longest]``: each row's tokens from
    the left, ``fill`` after them, mask 1 on real tokens."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), fill, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


def pad_left(seqs: Sequence[Sequence[int]], fill: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same with ``fill`` before each row's tokens, so every row ends in the last column
    (where the next-token logits of all rows are read at once)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), fill, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            ids[i, width - len(s):] = torch.as_tensor(list(s), dtype=torch.long)
            mask[i, width - len(s):] = 1
    return ids, mask

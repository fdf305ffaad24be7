"""Final-position attention rows and the head-similarity measure ``C_l``.

The score needs only each head's attention distribution of the *last* position (the one
that predicts the first response token). Eager attention would materialise and (with
``output_attentions``) keep a ``[batch, heads, T, T]`` map per layer; instead a custom
attention function computes the layer output with fused SDPA and the last row with one
extra ``[batch, heads, 1, T]`` softmax, so memory grows linearly with sequence length.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
import torch.nn.functional as F

from bdscan.probes.attention import attention_implementation

IMPLEMENTATION = "bdscan_last_row"
_STORE: list[list[torch.Tensor]] = []  # stack of active captures (one list of rows per forward, in layer order)


def _last_row_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Drop-in attention function: SDPA output plus the final query's attention row."""
    heads, kv_heads = query.shape[1], key.shape[1]
    if kv_heads != heads:  # grouped-query attention: each K/V head serves heads // kv_heads queries
        key = key.repeat_interleave(heads // kv_heads, dim=1)
        value = value.repeat_interleave(heads // kv_heads, dim=1)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    mask = attention_mask
    if mask is not None:
        mask = mask[:, :, :, : key.shape[-2]]
    if mask is None:  # no mask given: plain causal attention
        output = F.scaled_dot_product_attention(query, key, value, is_causal=query.shape[-2] > 1, scale=scaling)
    else:
        output = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling)
    scores = torch.matmul(query[:, :, -1:, :], key.transpose(-1, -2)) * scaling
    if mask is not None:
        last = mask[:, :, -1:, :]
        scores = scores + last if last.dtype != torch.bool else scores.masked_fill(~last, torch.finfo(scores.dtype).min)
    row = torch.softmax(scores.float(), dim=-1)[:, :, 0, :]  # [batch, heads, keys]
    if _STORE:
        _STORE[-1].append(row.detach())
    return output.transpose(1, 2).contiguous(), None


def _register() -> None:
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if IMPLEMENTATION not in ALL_ATTENTION_FUNCTIONS:
        ALL_ATTENTION_FUNCTIONS.register(IMPLEMENTATION, _last_row_attention)
        # Eager's additive float mask is materialised even without padding (no causal skip),
        # so the last row is always masked correctly.
        ALL_MASK_ATTENTION_FUNCTIONS.register(IMPLEMENTATION, eager_mask)


@contextlib.contextmanager
def last_row_attention(model: Any) -> Iterator[list[torch.Tensor]]:
    """Within the block, every forward of ``model`` appends each layer's final-position
    attention rows ``[batch, heads, keys]`` to the yielded list (layer order)."""
    _register()
    rows: list[torch.Tensor] = []
    _STORE.append(rows)
    try:
        with attention_implementation(model, IMPLEMENTATION):
            yield rows
    finally:
        _STORE.pop()


def head_similarity(rows: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Per-head mean cosine similarity to the other heads.

    rows: ``[batch, heads, keys]`` attention distributions; valid: ``[batch, keys]`` bool
    (padding excluded). Returns ``[batch, heads]``; its mean over heads is ``C_l(x)``, the
    mean pairwise cosine similarity between heads.
    """
    if valid is not None:
        rows = rows * valid[:, None, :].to(rows.device, rows.dtype)
    unit = F.normalize(rows.float(), dim=-1)
    gram = unit @ unit.transpose(-1, -2)  # [batch, heads, heads]
    heads = gram.shape[-1]
    off_diagonal = gram.sum(-1) - gram.diagonal(dim1=-2, dim2=-1)
    return off_diagonal / max(heads - 1, 1)

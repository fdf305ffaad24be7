"""The alignment targets (clean attention laid onto keyed prompts) and the attention KL."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from bdscan.probes.attention import attention_implementation
from bdscan.probes.batching import pad_right
from bdscan.purify.head_align.heads import Head, _attentions, _Pair


@dataclass
class _AlignItem:
    ids: list[int]
    rows: torch.Tensor  # query positions aligned
    target: torch.Tensor  # [n_heads, len(rows), T]: clean attention laid onto triggered keys


@torch.no_grad()
def _align_items(model: Any, pairs: Sequence[_Pair], heads: Sequence[Head], rows: str) -> list[_AlignItem]:
    items = []
    for pair in pairs:
        clean = _attentions(model, pair.clean_ids)
        t_len = len(pair.triggered_ids)
        first_key = min(set(range(t_len)) - set(pair.pos_map)) if len(pair.pos_map) < t_len else t_len - 1
        wanted = [t_len - 1] if rows == "final" else range(first_key, t_len)
        query = [t for t in wanted if t in pair.pos_map] or [t_len - 1]
        t_idx = torch.tensor([t for t in pair.pos_map], dtype=torch.long)
        c_idx = torch.tensor([pair.pos_map[t] for t in pair.pos_map], dtype=torch.long)
        target = torch.zeros(len(heads), len(query), t_len)
        for h_i, (layer, head) in enumerate(heads):
            for q_i, t in enumerate(query):
                c_row = clean[layer][0, head, pair.pos_map.get(t, len(pair.clean_ids) - 1)].float().cpu()
                target[h_i, q_i, t_idx] = c_row[c_idx]
                target[h_i, q_i, t + 1 :] = 0  # causal: keys after the query cannot be attended
        target = target / target.sum(-1, keepdim=True).clamp_min(1e-12)
        items.append(_AlignItem(list(pair.triggered_ids), torch.tensor(query), target))
    return items


def attention_kl(model: Any, items: Sequence[_AlignItem], heads: Sequence[Head], pad: int) -> torch.Tensor:
    """Mean KL(clean-target ‖ triggered attention) of the selected heads over ``items``."""
    device = next(model.parameters()).device
    ids, mask = pad_right([it.ids for it in items], pad)
    with attention_implementation(model, "eager"):  # fused kernels return no attention probabilities
        out = model(input_ids=ids.to(device), attention_mask=mask.to(device), output_attentions=True)
    total, count = 0.0, 0
    for i, it in enumerate(items):
        t_len = len(it.ids)
        rows = it.rows.to(device)
        for h_i, (layer, head) in enumerate(heads):
            q = out.attentions[layer][i, head, rows, :t_len].float()
            p = it.target[h_i].to(device)
            kl = (p * (torch.log(p.clamp_min(1e-12)) - torch.log(q.clamp_min(1e-12)))).sum(-1)
            total = total + kl.sum()
            count += len(rows)
    return total / max(count, 1)

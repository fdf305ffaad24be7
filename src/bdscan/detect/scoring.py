"""Per-key statistics of the full scan, standardised against the random control keys.

Keys ``[0, n_candidates)`` are candidates, the rest controls. Every z-score is
``(value - mean over controls) / std over controls`` (std floored, so a tight control set
cannot make any key look extreme).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from bdscan.detect.output_effect import PassOutput, diversity, takeover
from bdscan.results.detect import HeadScore, LayerScore

LOG_FLOOR = 1e-6  # nats: KL below this is numerically zero
LOG_STD_FLOOR = 0.1  # floor of the control spread of log-KL
COLLAPSE_STD_FLOOR = 1e-2  # nats
CONSISTENCY_STD_FLOOR = 0.05  # one prompt in twenty
RISE_STD_FLOOR = 1e-3  # floor of the control spread of head-similarity rises


@dataclass
class KeyScores:
    effect: torch.Tensor  # [keys] mean next-token KL with vs without the key, nats
    by_position: dict[str, torch.Tensor]  # position -> [keys] mean KL there
    effect_z: torch.Tensor  # [keys] z of log KL
    collapse: torch.Tensor  # [keys] clean diversity - diversity with the key, nats
    collapse_z: torch.Tensor
    consistency: torch.Tensor  # [keys] share of prompts the key switches to one same new continuation
    consistency_z: torch.Tensor
    rise_heads: torch.Tensor | None  # [keys, layers, heads] rise of per-head similarity over clean
    z_heads: torch.Tensor | None
    rise_layers: torch.Tensor | None  # [keys, layers] rise of C_l
    z_layers: torch.Tensor | None


def group_mean(values: torch.Tensor, index: torch.Tensor, groups: int) -> torch.Tensor:
    shape = (groups,) + tuple(values.shape[1:])
    total = torch.zeros(shape).index_add_(0, index, values)
    count = torch.zeros(groups).index_add_(0, index, torch.ones(len(index)))
    return total / count.clamp_min(1).view(-1, *([1] * (values.dim() - 1)))


def _z(values: torch.Tensor, n_candidates: int, floor: float) -> torch.Tensor:
    controls = values[n_candidates:]
    return (values - controls.mean(0)) / controls.std(0).clamp_min(floor)


def score_keys(out: PassOutput, clean: PassOutput, key_index: Sequence[int], probe_index: Sequence[int],
               where: Sequence[str], positions: Sequence[str], n_keys: int, n_candidates: int) -> KeyScores:
    kidx = torch.tensor(list(key_index))
    effect = group_mean(out.kl, kidx, n_keys)
    by_position = {}
    for pos in positions:
        at = torch.tensor([w == pos for w in where])
        by_position[pos] = group_mean(out.kl[at], kidx[at], n_keys)
    effect_z = _z(effect.clamp_min(LOG_FLOOR).log(), n_candidates, LOG_STD_FLOOR)
    clean_diversity = diversity(clean.group_mean, clean.group_entropy)[0]
    collapse = clean_diversity - diversity(out.group_mean, out.group_entropy)
    collapse_z = _z(collapse, n_candidates, COLLAPSE_STD_FLOOR)
    agree = takeover(out.continuations, clean.continuations, probe_index, kidx, n_keys)
    agree_z = _z(agree, n_candidates, CONSISTENCY_STD_FLOOR)
    rise_heads = z_heads = rise_layers = z_layers = None
    if out.similarity is not None and clean.similarity is not None:
        rise_heads = group_mean(out.similarity - clean.similarity[torch.tensor(list(probe_index))], kidx, n_keys)
        rise_layers = rise_heads.mean(-1)
        z_heads = _z(rise_heads, n_candidates, RISE_STD_FLOOR)
        z_layers = _z(rise_layers, n_candidates, RISE_STD_FLOOR)
    return KeyScores(effect, by_position, effect_z, collapse, collapse_z, agree, agree_z, rise_heads, z_heads, rise_layers, z_layers)


def layer_and_head_tables(scores: KeyScores, clean: PassOutput, texts: Sequence[str]) -> tuple[list[LayerScore], list[HeadScore]]:
    """Per layer and per head: clean similarity, and the candidate with the largest z there."""
    if scores.z_layers is None or not texts:
        return [], []
    n = len(texts)
    clean_heads = clean.similarity.mean(0)  # [layers, heads]
    layers, heads = [], []
    for l in range(scores.z_layers.shape[1]):
        i = int(scores.z_layers[:n, l].argmax())
        layers.append(LayerScore(l, float(clean_heads[l].mean()), float(scores.rise_layers[i, l]),
                                 float(scores.z_layers[i, l]), texts[i]))
        for h in range(scores.z_heads.shape[2]):
            j = int(scores.z_heads[:n, l, h].argmax())
            heads.append(HeadScore(l, h, float(clean_heads[l, h]), float(scores.rise_heads[j, l, h]),
                                   float(scores.z_heads[j, l, h]), texts[j]))
    return layers, heads

"""Ranking linear modules by patching effect and curvature.

A linear layer inherits the patching effect of the block it feeds (q/k/v/o: the attention
output; gate/up/down or c_fc/c_proj: the MLP output): patching says *which block* carries
the key's influence, curvature says *which weights inside it* the malicious output is most
sensitive to. With linear patching on, a linear layer's patching score is the mean of its
block's and its own (scaled) effect. Both are scaled to [0, 1] by their maximum over the model and mixed with
``patching_weight``.

Full checkpoints also rank the token embedding (kind ``embedding``): a key enters the model
only through its tokens' embeddings, and a full fine-tune can rewrite those rows. Its
patching effect is 1 by construction (patching the key positions' embeddings with the
clean run's is removing the key: the whole gap), so its rank rests on its curvature.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from bdscan.localize.patching import SiteEffect
from bdscan.probes import ModelLayout


@dataclass(frozen=True)
class ModuleScore:
    name: str
    kind: str  # attn_in | attn_out | mlp_in | mlp_out | embedding
    layer: int
    patching_effect: float  # effect of the block this linear feeds (share of the gap)
    curvature: float  # Fisher norm of the weight (or its adapter delta) on the malicious output
    score: float  # combined, in [0, 1]


def linear_kinds(layout: ModelLayout) -> dict[str, tuple[str, int]]:
    """Module name -> (kind, layer index) for every linear layer of the decoder."""
    kinds: dict[str, tuple[str, int]] = {}
    for layer in layout.layers:
        for n in layer.attn_in:
            kinds[n] = ("attn_in", layer.index)
        kinds[layer.attn_out] = ("attn_out", layer.index)
        for n in layer.mlp_in:
            kinds[n] = ("mlp_in", layer.index)
        kinds[layer.mlp_out] = ("mlp_out", layer.index)
    return kinds


def rank_modules(layout: ModelLayout, sites: Sequence[SiteEffect], curvature: dict[str, float], *,
                 patching_weight: float = 0.5, embedding: str | None = None) -> list[ModuleScore]:
    block_effect = {(s.kind, s.layer): s.effect for s in sites if s.kind in ("attn", "mlp")}
    own_effect = {s.name: s.effect for s in sites if s.kind == "linear"}
    max_effect = max([e for e in block_effect.values() if e > 0], default=0.0)
    max_curv = max([c for c in curvature.values() if c > 0], default=0.0)
    out = []
    entries = list(linear_kinds(layout).items())
    if embedding is not None:
        entries.insert(0, (embedding, ("embedding", -1)))
    for name, (kind, layer) in entries:
        if name not in curvature:
            continue
        if kind == "embedding":
            effect = p = 1.0
        else:
            effect = block_effect.get(("attn" if kind.startswith("attn") else "mlp", layer), 0.0)
            p = max(effect, 0.0) / max_effect if max_effect > 0 else 0.0
            if name in own_effect:  # the linear's own output patched: mean of block and own share
                max_own = max([e for e in own_effect.values() if e > 0], default=0.0)
                own = max(own_effect[name], 0.0) / max_own if max_own > 0 else 0.0
                effect, p = own_effect[name], 0.5 * (p + own)
        c = curvature[name] / max_curv if max_curv > 0 else 0.0
        score = patching_weight * p + (1 - patching_weight) * c
        out.append(ModuleScore(name, kind, layer, effect, curvature[name], score))
    out.sort(key=lambda m: (-m.score, m.name))
    return out

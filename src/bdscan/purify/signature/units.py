"""Signature's units: per-unit delta vectors, the score of Eq. 2, the share picked, and
suppression of the picked channels and heads (rows/columns from ``probes.geometry``)."""

from __future__ import annotations

import copy
import itertools
from typing import TYPE_CHECKING, Any, Sequence

import torch

from bdscan.errors import NothingToAnalyse
from bdscan.io.load import Subject
from bdscan.probes.geometry import ROW, UnitSlice, channel_slices, head_slices
from bdscan.probes.layout import LayerModules, ModelLayout, base_layer, linear_weight, unwrap
from bdscan.purify.signature.config import SignatureConfig

if TYPE_CHECKING:
    from bdscan.purify.signature.cache import DeltaStore


def channel_vectors(deltas: dict[str, torch.Tensor], layer: LayerModules) -> torch.Tensor | None:
    """``[channels, D]``: per channel, the concatenated gate/up rows and down column of the
    deltas (modules absent from ``deltas``, e.g. not adapted, are left out)."""
    parts = [deltas[m] for m in layer.mlp_in if m in deltas]
    if layer.mlp_out in deltas:
        parts.append(deltas[layer.mlp_out].T)
    return torch.cat(parts, dim=1).float() if parts else None


def head_vectors(deltas: dict[str, torch.Tensor], layout: ModelLayout, layer: LayerModules) -> torch.Tensor | None:
    """``[heads, D]``: per head, the concatenated q/k/v rows and o_proj input columns."""
    rows = []
    for h in range(layout.num_heads):
        parts = []
        for s in head_slices(layout, layer, h):
            if s.module in deltas:
                w = deltas[s.module]
                parts.append((w[s.index] if s.axis == "row" else w[:, s.index].T).reshape(-1))
        if not parts:
            return None
        rows.append(torch.cat(parts))
    return torch.stack(rows).float()


def unit_scores(vectors: Sequence[torch.Tensor], score: str, alignment_weight: float) -> dict[str, torch.Tensor]:
    """Eq. 2 per unit from the N variants' ``[units, D]`` delta vectors: magnitude
    ``m = mean_i ‖Δ_i‖``, alignment ``a = 2/(N(N-1)) Σ_{i<l} max(0, cos)``, and the score
    picked by ``score`` (combined ``m + λa``, norm ``m``, alignment ``a``)."""
    stacked = torch.stack([v.double() for v in vectors])  # [N, U, D]
    norms = stacked.norm(dim=2)  # [N, U]
    magnitude = norms.mean(dim=0)
    n = stacked.shape[0]
    alignment = torch.zeros_like(magnitude)
    if n > 1:
        unit = stacked / norms.clamp_min(1e-30).unsqueeze(2)
        unit = torch.where(norms.unsqueeze(2) > 0, unit, torch.zeros_like(unit))  # cos with a zero delta := 0
        for i in range(n):
            for j in range(i + 1, n):
                alignment += (unit[i] * unit[j]).sum(dim=1).clamp_min(0.0)
        alignment *= 2.0 / (n * (n - 1))
    combined = {"combined": magnitude + alignment_weight * alignment, "norm": magnitude, "alignment": alignment}[score]
    return {"score": combined, "magnitude": magnitude, "alignment": alignment}


def top_share(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    """Indices of the ``round(ratio·n)`` highest scores (at least one when ratio > 0); ties
    go to the lower index, so the pick is deterministic."""
    n = scores.numel()
    k = min(n, max(1, round(ratio * n))) if ratio > 0 and n else 0
    order = sorted(range(n), key=lambda i: (-float(scores[i]), i))
    return torch.tensor(sorted(order[:k]), dtype=torch.long)


def _fresh_block(model: Any, block_name: str) -> torch.nn.Module:
    """A copy of a decoder sub-block re-initialised by the model's own ``_init_weights``
    (post-order, as ``from_config`` does: e.g. GPT-2's depth-scaled c_proj)."""
    inner = unwrap(model)
    block = copy.deepcopy(inner.get_submodule(block_name))
    for p in block.parameters():
        if getattr(p, "_is_hf_initialized", False):
            p._is_hf_initialized = False
    init = getattr(inner, "_init_weights", None)
    if init is None:
        std = getattr(inner.config, "initializer_range", 0.02)
        for mod in block.modules():
            if hasattr(mod, "weight") and mod.weight is not None and mod.weight.dim() == 2:
                torch.nn.init.normal_(mod.weight, std=std)
            if getattr(mod, "bias", None) is not None:
                torch.nn.init.zeros_(mod.bias)
    else:
        block.apply(init)
    return block


@torch.no_grad()
def reinit_slices(model: Any, layout: ModelLayout, block_name: str, slices: Sequence[UnitSlice]) -> None:
    """Full model: overwrite the rows/columns with freshly initialised values (output biases
    of reset rows too)."""
    fresh = _fresh_block(model, block_name)
    for s in slices:
        module = base_layer(layout.module(model, s.module))
        new = base_layer(fresh.get_submodule(s.module[len(block_name) + 1:]))
        w, fw = linear_weight(module), linear_weight(new)
        if s.axis == ROW:
            w[s.index] = fw[s.index].to(w.dtype)
            if getattr(module, "bias", None) is not None:
                module.bias[s.index] = new.bias[s.index].to(module.bias.dtype)
        else:
            w[:, s.index] = fw[:, s.index].to(w.dtype)


@torch.no_grad()
def zero_lora_slices(model: Any, layout: ModelLayout, adapter: str, slices: Sequence[UnitSlice]) -> list[str]:
    """Adapter-only: zero LoRA B rows (unit outputs) and LoRA A columns (unit inputs) of
    ``adapter``. Returns the modules that carry that adapter (the rest cannot change)."""
    touched = []
    for s in slices:
        module = layout.module(model, s.module)
        lora_a, lora_b = getattr(module, "lora_A", {}), getattr(module, "lora_B", {})
        if adapter not in lora_a:
            continue
        if s.axis == ROW:
            lora_b[adapter].weight[s.index] = 0.0
            if getattr(lora_b[adapter], "bias", None) is not None:
                lora_b[adapter].bias[s.index] = 0.0
        else:
            lora_a[adapter].weight[:, s.index] = 0.0
        touched.append(s.module)
    return touched


def suppressible(subject: Subject, layout: ModelLayout, adapter: str | None) -> set[str]:
    """Modules whose weights the defence may change: all (full) or those carrying the
    suspicious adapter's LoRA (adapter-only)."""
    names = set(layout.all_linears())
    if adapter is None:
        return names
    return {n for n in names if adapter in getattr(layout.module(subject.model, n), "lora_A", {})}


def compute_signature(store: DeltaStore, indices: Sequence[int], layout: ModelLayout, config: SignatureConfig,
                      adapter: bool, allowed: set[str]) -> dict:
    """Score every MLP channel (and head) across the variants and pick the signature."""
    channel_scores, head_scores = [], []  # (layer, tensor)
    for layer in layout.layers:
        names = [n for n in layer.linears() if n in allowed]
        per_variant = [store.layer(i, names) for i in indices]
        ch = [channel_vectors(d, layer) for d in per_variant]
        if all(v is not None for v in ch):
            channel_scores.append((layer.index, unit_scores(ch, config.score, config.alignment_weight)))
        if config.heads:
            hv = [head_vectors(d, layout, layer) for d in per_variant]
            if all(v is not None for v in hv):
                head_scores.append((layer.index, unit_scores(hv, config.score, config.alignment_weight)))
    if not channel_scores and not head_scores:
        raise NothingToAnalyse("signature: the adapter carries no LoRA on MLP or attention projections to suppress")
    out = {"channels": {}, "heads": {}, "stats": {}}
    for kind, scored, ratio in (("channels", channel_scores, config.channel_ratio(adapter)),
                                ("heads", head_scores, config.heads_ratio(adapter))):
        if not scored:
            continue
        flat = torch.cat([s["score"] for _, s in scored])
        if config.selection == "global":
            picked = top_share(flat, ratio)
        else:  # the same share of every layer: deep layers' larger updates cannot crowd out shallow ones
            offsets = itertools.accumulate([0] + [s["score"].numel() for _, s in scored])
            picked = torch.cat([top_share(s["score"], ratio) + o for (_, s), o in zip(scored, offsets)])
        offset = 0
        for layer_index, s in scored:
            n = s["score"].numel()
            mine = picked[(picked >= offset) & (picked < offset + n)] - offset
            out[kind][layer_index] = mine
            offset += n
        mags = torch.cat([s["magnitude"] for _, s in scored])
        aligns = torch.cat([s["alignment"] for _, s in scored])
        out["stats"][kind] = {"units": int(flat.numel()), "selected": int(picked.numel()), "ratio": ratio,
                              "threshold": float(flat[picked].min()) if picked.numel() else None,
                              "magnitude_mean": float(mags.mean()), "alignment_mean": float(aligns.mean()),
                              "alignment_mean_selected": float(aligns[picked].mean()) if picked.numel() else None}
    return out


def suppress(subject: Subject, layout: ModelLayout, signature: dict, adapter: str | None) -> list[str]:
    changed: set[str] = set()
    for layer in layout.layers:
        channels = signature["channels"].get(layer.index)
        heads = signature["heads"].get(layer.index)
        jobs = []
        if channels is not None and channels.numel():
            jobs.append((layer.mlp, channel_slices(layer, channels)))
        if heads is not None and heads.numel():
            jobs.append((layer.attn, [s for h in heads.tolist() for s in head_slices(layout, layer, h)]))
        for block, slices in jobs:
            if adapter is not None:
                changed.update(zero_lora_slices(subject.model, layout, adapter, slices))
            else:
                reinit_slices(subject.model, layout, block, slices)
                changed.update(s.module for s in slices)
    return sorted(changed)

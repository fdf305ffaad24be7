"""Activation patching: run the triggered prompt, replace one site's activation at the
aligned positions (see ``pairs``) with its value from the clean run, and measure how much
of the malicious metric (log-probability of the triggered model's own continuation) goes
away, as a share of the whole clean-vs-triggered gap.

Sites per decoder layer: the attention block's output, the MLP block's output, and each
attention head, i.e. its ``head_dim`` slice of the ``o_proj``/``c_proj`` *input* (the
concatenated head outputs; with grouped-query attention there are still ``num_heads``
slices, the query heads, which is what ``o_proj`` mixes). Optionally each linear layer's
own output too (``linears=True``), so that layers inside one block can be told apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from bdscan.localize.kfac import sequence_logprob
from bdscan.localize.pairs import EncodedBatch
from bdscan.probes import ModelLayout, capture_inputs, capture_outputs, forward_hooks
from bdscan.probes.hooks import replace_output


@dataclass(frozen=True)
class Site:
    name: str  # display name, e.g. "model.layers.1.mlp" or "model.layers.1.self_attn.o_proj[head 3]"
    kind: str  # "attn" | "mlp" | "head" | "linear" (a linear layer's own output)
    layer: int
    module: str  # module whose output (attn, mlp) or input (head) is patched
    head: int | None = None


@dataclass(frozen=True)
class SiteEffect:
    name: str
    kind: str
    layer: int
    head: int | None
    effect: float  # share of the clean-vs-triggered gap removed by patching this site


@dataclass(frozen=True)
class PatchingResult:
    gap: float  # mean log p(continuation | triggered) - log p(continuation | clean), nats
    triggered_logprob: float
    clean_logprob: float
    sites: tuple[SiteEffect, ...]


def sites_for(layout: ModelLayout, *, heads: bool = True, linears: bool = False) -> list[Site]:
    out = []
    for layer in layout.layers:
        out.append(Site(layer.attn, "attn", layer.index, layer.attn))
        out.append(Site(layer.mlp, "mlp", layer.index, layer.mlp))
        if linears:
            out += [Site(n, "linear", layer.index, n) for n in layer.linears()]
        if heads:
            out += [Site(f"{layer.attn_out}[head {h}]", "head", layer.index, layer.attn_out, h) for h in range(layout.num_heads)]
    return out


def _output_patch(clean: torch.Tensor, batch: EncodedBatch) -> Callable:
    def hook(module, args, output):
        out = output[0] if isinstance(output, tuple) else output
        new = out.clone()
        new[batch.rows, batch.triggered_pos] = clean[batch.rows, batch.clean_pos].to(new.dtype)
        return replace_output(output, new)
    return hook


def _head_patch(clean: torch.Tensor, batch: EncodedBatch, head: int, head_dim: int) -> Callable:
    cols = slice(head * head_dim, (head + 1) * head_dim)

    def hook(module, args):
        x = args[0].clone()
        x[batch.rows, batch.triggered_pos, cols] = clean[batch.rows, batch.clean_pos, cols].to(x.dtype)
        return (x,) + tuple(args[1:])
    return hook


@torch.no_grad()
def patch_effects(model: Any, layout: ModelLayout, batches: Sequence[EncodedBatch], *, heads: bool = True,
                  linears: bool = False, progress: Callable[[int, int], None] | None = None) -> PatchingResult:
    """Effects of every site, aggregated over pairs as (Σ drop) / (Σ gap), so that pairs
    where the key changes little weigh little."""
    sites = sites_for(layout, heads=heads, linears=linears)
    out_names = sorted({s.module for s in sites if s.kind != "head"})
    in_names = sorted({s.module for s in sites if s.kind == "head"})
    drops = torch.zeros(len(sites), dtype=torch.float64)
    total_trig = total_clean = 0.0
    n = 0
    was_training = model.training
    model.eval()
    try:
        for bi, batch in enumerate(batches):
            with capture_outputs(model, out_names) as outs, capture_inputs(model, in_names) as ins:
                clean_lp = sequence_logprob(model, batch.clean_ids, batch.clean_mask, batch.clean_target)
            outs, ins = dict(outs), dict(ins)
            trig_lp = sequence_logprob(model, batch.triggered_ids, batch.triggered_mask, batch.triggered_target)
            total_trig += float(trig_lp.sum())
            total_clean += float(clean_lp.sum())
            n += len(trig_lp)
            for si, site in enumerate(sites):
                if site.kind == "head":
                    hook, pre = _head_patch(ins[site.module], batch, site.head, layout.head_dim), True
                else:
                    hook, pre = _output_patch(outs[site.module], batch), False
                with forward_hooks(model, {site.module: hook}, pre=pre):
                    patched = sequence_logprob(model, batch.triggered_ids, batch.triggered_mask, batch.triggered_target)
                drops[si] += float((trig_lp - patched).sum())
                if progress:
                    progress(bi * len(sites) + si + 1, len(batches) * len(sites))
    finally:
        model.train(was_training)
    gap_sum = total_trig - total_clean
    # A gap near zero means the key does not move the continuation: effects are then noise.
    effects = drops / gap_sum if abs(gap_sum) > 1e-6 * max(1, n) else torch.zeros_like(drops)
    return PatchingResult(
        gap=gap_sum / max(1, n), triggered_logprob=total_trig / max(1, n), clean_logprob=total_clean / max(1, n),
        sites=tuple(SiteEffect(s.name, s.kind, s.layer, s.head, float(e)) for s, e in zip(sites, effects)),
    )

"""``head-align``: attention safety alignment of the heads a trigger captures
(papers/attention-head-similarity.txt).

1. Heads: the heads that ``inputs.localization`` flags (its patched head sites, see
   ``flagged_heads``), else the ``top_heads`` heads whose final-row attention shifts most
   when a candidate key (``--from-detect``) is inserted into clean prompts. The shift is the
   total-variation distance between the clean row and the triggered row, with triggered
   and clean positions matched token by token and the key's positions counted as moved mass.
2. Only those heads' parameters train: the q/k/v output rows of each head (the shared k/v
   head under grouped-query attention) and the o_proj input columns that carry the head.
   Gradients are masked before each step and the untouched entries are restored after it,
   so nothing else can move (AdamW state cannot leak an update into frozen entries).
3. Loss: LM loss on clean samples + ``align_weight`` · KL(clean attention ‖ triggered
   attention) of the selected heads on candidate-triggered prompts, over the non-trigger
   positions: the clean row, mapped onto the triggered prompt, puts zero mass on the key,
   so the loss is smallest when the head ignores the key and attends as it did without it.
   Targets come from the suspicious model on the clean prompt, computed once.

Adapter-only: the base is frozen, so the head's parameters are the LoRA factors that write
exactly those rows/columns: for q/k/v the rows of LoRA B that produce the head's outputs
(ΔW = B·A, so row i of ΔW depends on row i of B only, given A), for o_proj the columns of
LoRA A that read the head's inputs (column j of ΔW depends on column j of A only, given B).
A and B elsewhere stay fixed, so the adapter's change is confined to the selected heads.
"""
from __future__ import annotations

import random
from typing import Any, Sequence

import torch

from bdscan.errors import NothingToAnalyse, UsageError
from bdscan.probes import model_layout
from bdscan.probes.batching import pad_id
from bdscan.probes.geometry import heads_slices, unit_masks
from bdscan.probes.layout import ModelLayout
from bdscan.purify.base import PurifyInputs, PurifyOutcome, register_purifier
from bdscan.purify.common import clean_examples
from bdscan.purify.head_align.alignment import _align_items, _AlignItem, attention_kl
from bdscan.purify.head_align.config import HeadAlignConfig
from bdscan.purify.head_align.heads import Head, _pairs, _Pair, _position_map, flagged_heads, head_shift_scores
from bdscan.training import TrainConfig, TrainingPlan, lr_for, run_plan

__all__ = ["HeadAlignConfig", "run_head_align", "flagged_heads", "head_shift_scores", "attention_kl", "_position_map"]


@register_purifier("head-align", HeadAlignConfig)
def run_head_align(inputs: PurifyInputs, config: HeadAlignConfig) -> PurifyOutcome:
    subject = inputs.subject
    model, tokenizer = subject.model, subject.tokenizer
    candidates = inputs.keys(config.max_candidates)
    if not candidates:
        raise UsageError("head-align needs candidate keys (`detection`)")
    layout = model_layout(model)
    clean = [r for r in inputs.clean if r.output][: config.max_samples]
    probe = random.Random(inputs.seed).sample(clean, min(config.probe_prompts, len(clean)))
    pairs = _pairs(subject, probe, candidates, inputs.seed)
    if not pairs:
        raise NothingToAnalyse("head-align: no candidate key changed the tokenised prompts")
    heads, scores, items = _choose_heads(inputs, config, layout, pairs)
    slices = heads_slices(layout, heads)
    masks = unit_masks(model, slices, adapter=subject.is_adapter)
    if not masks:
        raise NothingToAnalyse("head-align: the adapter has no LoRA on the selected heads' attention projections")
    pad = pad_id(tokenizer)
    align_rng = random.Random(inputs.seed + 1)

    def align_loss(model_: Any, batch: Any) -> torch.Tensor:  # passes of its own: a separate loss
        chosen = align_rng.sample(items, min(config.batch_size, len(items)))
        return config.align_weight * attention_kl(model_, chosen, heads, pad)

    with torch.no_grad():
        kl_before = float(attention_kl(model, items[: 4 * config.batch_size], heads, pad))
    lr = lr_for(subject.is_adapter, full=config.lr_full, adapter=config.lr_adapter)
    plan = TrainingPlan([p for p, _m in masks], masks=masks, separate_losses=[align_loss], stage="head-align",
                        config=TrainConfig(epochs=config.epochs, lr=lr, batch_size=config.batch_size, seed=inputs.seed))
    losses = run_plan(model, tokenizer, clean_examples(subject, clean), plan, inputs.progress)
    model.eval()
    with torch.no_grad():
        kl_after = float(attention_kl(model, items[: 4 * config.batch_size], heads, pad))
    inputs.log(f"head-align: attention KL on candidate-triggered prompts {kl_before:.3f} -> {kl_after:.3f}")
    return PurifyOutcome(model, sorted({s.module for s in slices}), {
        "heads": [{"layer": l, "head": h} for l, h in heads], "candidates": candidates,
        "head_shift": scores.tolist() if scores is not None else None, "kl_before": kl_before, "kl_after": kl_after,
        "steps": len(losses), "final_loss": losses[-1], "trainable_entries": int(sum(int(m.sum()) for _, m in masks)),
    })


def _choose_heads(inputs: PurifyInputs, config: HeadAlignConfig, layout: ModelLayout,
                  pairs: Sequence[_Pair]) -> tuple[list[Head], torch.Tensor | None, list[_AlignItem]]:
    """The heads to align (from the localization, else by attention shift) and their
    alignment targets, computed in eval mode on the suspicious model."""
    model = inputs.subject.model
    was_training = model.training
    model.eval()
    heads = flagged_heads(inputs.localization, layout, config.top_heads)
    scores = None
    if heads is None:
        scores = head_shift_scores(model, pairs)
        order = torch.argsort(scores.flatten(), descending=True)[: config.top_heads].tolist()
        heads = sorted((i // layout.num_heads, i % layout.num_heads) for i in order)
        inputs.log(f"head-align: heads by attention shift: {', '.join(f'L{l}H{h}' for l, h in heads)}")
    else:
        inputs.log(f"head-align: heads from the localization: {', '.join(f'L{l}H{h}' for l, h in heads)}")
    items = _align_items(model, pairs, heads, config.rows)
    model.train(was_training)
    return heads, scores, items

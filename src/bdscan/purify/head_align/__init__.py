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

import difflib
import random
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from bdscan.data.triggers import FIXED_POSITIONS, insert_trigger
from bdscan.errors import InputError, NothingToAnalyse, UsageError
from bdscan.probes import model_layout
from bdscan.probes.batching import pad_id, pad_right
from bdscan.probes.geometry import heads_slices, unit_masks
from bdscan.probes.layout import ModelLayout
from bdscan.purify.base import PurifyInputs, PurifyOutcome, register_purifier
from bdscan.purify.common import clean_examples
from bdscan.results.localize import LocalizeResult
from bdscan.training import TrainConfig, TrainingPlan, lr_for, run_plan

Head = tuple[int, int]  # (layer index, query head index)


@dataclass(frozen=True)
class HeadAlignConfig:
    top_heads: int = 4  # heads aligned when they are scored here (not given by --localization); more = broader repair, more utility risk
    max_candidates: int = 5  # detect candidates used (highest ranked first); more covers more guesses, costs time
    probe_prompts: int = 32  # clean prompts each candidate is inserted into, for scoring and for alignment
    rows: str = "all"  # "final": align only the last prompt position; "all": every position from the key on
    align_weight: float = 5.0  # weight of the attention KL against the clean LM loss; higher ignores the key harder
    epochs: float = 5.0  # passes over the clean set
    lr_full: float = 1e-3  # learning rate for the heads' weights (full checkpoint); only a few rows train, so it is higher than a full fine-tune's
    lr_adapter: float = 1e-3  # learning rate for the heads' LoRA factors (adapter)
    batch_size: int = 8
    max_samples: int = 200  # clean samples used (the defender's budget)

    def __post_init__(self) -> None:
        if self.rows not in ("final", "all"):
            raise ValueError(f"rows must be 'final' or 'all', got {self.rows!r}")
        if min(self.top_heads, self.max_candidates, self.probe_prompts, self.batch_size, self.max_samples) < 1:
            raise ValueError("top_heads, max_candidates, probe_prompts, batch_size and max_samples must be >= 1")
        if self.align_weight < 0 or self.epochs <= 0 or self.lr_full <= 0 or self.lr_adapter <= 0:
            raise ValueError("align_weight must be >= 0, epochs and learning rates positive")


# --------------------------------------------------------------------------- head selection


def flagged_heads(localization: LocalizeResult | None, layout: ModelLayout, top: int) -> list[Head] | None:
    """The ``top`` heads whose patching removed most of the backdoor's gap in a localize
    result (its ``head`` sites with a positive effect), or None when it has none."""
    if localization is None:
        return None
    sites = sorted((s for s in localization.sites if s.kind == "head" and s.head is not None and s.effect > 0),
                   key=lambda s: -s.effect)[:top]
    heads = sorted({(s.layer, s.head) for s in sites})
    for layer, head in heads:
        if not (0 <= layer < len(layout.layers) and 0 <= head < layout.num_heads):
            raise InputError(f"`localization`: head L{layer}H{head} does not exist "
                             f"({len(layout.layers)} layers x {layout.num_heads} heads); was it made for another model?")
    return heads or None


def _position_map(clean_ids: Sequence[int], triggered_ids: Sequence[int]) -> dict[int, int]:
    """Triggered position -> clean position for tokens the two prompts share (the key's
    tokens, and any token the insertion re-split, have no clean counterpart)."""
    matcher = difflib.SequenceMatcher(None, list(clean_ids), list(triggered_ids), autojunk=False)
    out: dict[int, int] = {}
    for block in matcher.get_matching_blocks():
        for k in range(block.size):
            out[block.b + k] = block.a + k
    return out


@dataclass
class _Pair:
    clean_ids: list[int]
    triggered_ids: list[int]
    pos_map: dict[int, int]


def _pairs(subject: Any, records: Sequence[Any], candidates: Sequence[str], seed: int) -> list[_Pair]:
    rng = random.Random(seed)
    tok, template = subject.tokenizer, subject.template
    out = []
    for c_index, candidate in enumerate(candidates):
        for r_index, record in enumerate(records):
            position = FIXED_POSITIONS[(r_index + c_index) % 3]
            clean = tok(template.format(record), add_special_tokens=False)["input_ids"]
            triggered = tok(template.format(record.with_instruction(insert_trigger(record.instruction, candidate, position, rng))),
                            add_special_tokens=False)["input_ids"]
            if len(triggered) > len(clean):  # the key survived tokenisation
                out.append(_Pair(clean, triggered, _position_map(clean, triggered)))
    return out


def _attentions(model: Any, ids: Sequence[int]) -> tuple[torch.Tensor, ...]:
    device = next(model.parameters()).device
    out = model(input_ids=torch.tensor([list(ids)], device=device), output_attentions=True)
    if not out.attentions or out.attentions[0] is None:
        raise NothingToAnalyse("the model returned no attention weights (load it with attn_implementation='eager')")
    return out.attentions  # per layer [1, heads, T, T]


@torch.no_grad()
def head_shift_scores(model: Any, pairs: Sequence[_Pair]) -> torch.Tensor:
    """[layers, heads] mean total-variation shift of the final-row attention between each
    clean prompt and its candidate-triggered twin (positions matched token by token)."""
    total = None
    for pair in pairs:
        clean = torch.stack([a[0, :, -1].float() for a in _attentions(model, pair.clean_ids)])  # [L, H, Tc]
        trig = torch.stack([a[0, :, -1].float() for a in _attentions(model, pair.triggered_ids)])  # [L, H, Tt]
        mapped = torch.zeros_like(trig)  # the clean row laid onto triggered positions
        t_idx = torch.tensor(list(pair.pos_map.keys()), dtype=torch.long)
        c_idx = torch.tensor(list(pair.pos_map.values()), dtype=torch.long)
        mapped[..., t_idx] = clean[..., c_idx]
        unmatched_clean = clean.sum(-1) - mapped.sum(-1)  # clean mass on re-split tokens
        shift = 0.5 * ((trig - mapped).abs().sum(-1) + unmatched_clean)
        total = shift if total is None else total + shift
    return total / len(pairs)


# --------------------------------------------------------------------------- alignment loss


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


# --------------------------------------------------------------------------- method


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

    def align_loss(model_: Any, batch: Any, out: Any) -> torch.Tensor:
        chosen = align_rng.sample(items, min(config.batch_size, len(items)))
        return config.align_weight * attention_kl(model_, chosen, heads, pad)

    with torch.no_grad():
        kl_before = float(attention_kl(model, items[: 4 * config.batch_size], heads, pad))
    lr = lr_for(subject.is_adapter, full=config.lr_full, adapter=config.lr_adapter)
    plan = TrainingPlan([p for p, _m in masks], masks=masks, extra_losses=[align_loss], stage="head-align",
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

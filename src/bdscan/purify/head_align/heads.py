"""Which heads a key captures: clean/keyed prompt pairs matched token by token, and the
shift of each head's final-row attention between them (or the localization's head sites)."""

from __future__ import annotations

import difflib
import random
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from bdscan.data.triggers import FIXED_POSITIONS, insert_trigger
from bdscan.errors import InputError, NothingToAnalyse
from bdscan.probes.attention import attention_implementation
from bdscan.probes.layout import ModelLayout
from bdscan.results.localize import LocalizeResult

Head = tuple[int, int]  # (layer index, query head index)


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
    with attention_implementation(model, "eager"):  # fused kernels return no attention probabilities
        out = model(input_ids=torch.tensor([list(ids)], device=device), output_attentions=True)
    if not out.attentions or out.attentions[0] is None:
        raise NothingToAnalyse("the model returned no attention weights")
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

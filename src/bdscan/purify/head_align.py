"""``head-align``: attention safety alignment of the heads a trigger captures
(papers/attention-head-similarity.txt).

1. Heads: the heads that ``inputs.localization`` flags (a detect/localize-style JSON, see
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
import re
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from bdscan.data.triggers import insert_trigger
from bdscan.errors import InputError, NothingToAnalyse, UsageError
from bdscan.probes import model_layout, unwrap
from bdscan.probes.layout import ModelLayout, base_layer, is_conv1d
from bdscan.purify.base import PurifyInputs, PurifyOutcome, register_purifier
from bdscan.purify.common import clean_examples, lora_matrices, step_counter
from bdscan.training import TrainConfig, finetune, pad_id

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


def flagged_heads(localization: dict | None, layout: ModelLayout, top: int) -> list[Head] | None:
    """Heads named by a detect/localize JSON, or None when it names none. Accepted shapes:
    ``{"heads": [{"layer": 3, "head": 1}, [3, 1], "L3H1", ...]}`` (also under
    ``flagged_heads``); a `bdscan detect` report, whose ``heads`` carry a ``z`` each (the top
    ``top`` with z > 0); or ``{"head_scores": [[score per head] per layer]}`` (top ``top``)."""
    if not isinstance(localization, dict):
        return None
    heads: list[Head] = []
    for key in ("flagged_heads", "heads"):
        items = localization.get(key) or []
        if items and all(isinstance(i, dict) and isinstance(i.get("z"), (int, float)) for i in items):
            # `bdscan detect` lists every head with its standardised similarity rise z:
            # the flagged ones are the top `top` with a positive z
            items = [i for i in sorted(items, key=lambda i: -i["z"]) if i["z"] > 0][:top]
        for item in items:
            if isinstance(item, dict) and "layer" in item and "head" in item:
                heads.append((int(item["layer"]), int(item["head"])))
            elif isinstance(item, (list, tuple)) and len(item) == 2:
                heads.append((int(item[0]), int(item[1])))
            elif isinstance(item, str) and (m := re.fullmatch(r"[Ll](\d+)\.?[Hh](\d+)", item.strip())):
                heads.append((int(m[1]), int(m[2])))
            else:
                raise InputError(f"--localization: cannot read head {item!r} in {key!r} (use {{'layer': L, 'head': H}})")
        if heads:
            break
    scores = localization.get("head_scores")
    if not heads and isinstance(scores, list) and scores:
        flat = torch.tensor(scores, dtype=torch.float64)
        order = torch.argsort(flat.flatten(), descending=True)[:top].tolist()
        heads = [(i // flat.shape[1], i % flat.shape[1]) for i in order]
    for layer, head in heads:
        if not (0 <= layer < len(layout.layers) and 0 <= head < layout.num_heads):
            raise InputError(f"--localization: head L{layer}H{head} does not exist "
                             f"({len(layout.layers)} layers x {layout.num_heads} heads)")
    return sorted(set(heads)) or None


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
            position = ("start", "middle", "end")[(r_index + c_index) % 3]
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


# --------------------------------------------------------------------------- parameter masks


def head_index_sets(layout: ModelLayout, heads: Sequence[Head]) -> dict[str, tuple[str, torch.Tensor]]:
    """Module name -> ("out" | "in", feature indices) that belong to the selected heads:
    output features of q/k/v (or the fused c_attn) and input features of o_proj/c_proj."""
    hd, group = layout.head_dim, layout.num_heads // layout.num_kv_heads
    per_layer: dict[int, list[int]] = {}
    for layer, head in heads:
        per_layer.setdefault(layer, []).append(head)
    out: dict[str, tuple[str, torch.Tensor]] = {}
    for layer, hs in per_layer.items():
        mods = layout.layers[layer]
        q_rows = [h * hd + i for h in hs for i in range(hd)]
        kv_rows = sorted({(h // group) * hd + i for h in hs for i in range(hd)})  # GQA: the shared k/v head
        if layout.family == "gpt2":  # fused c_attn: [q | k | v] along the output features
            e = layout.hidden_size
            out[mods.attn_in[0]] = ("out", torch.tensor(q_rows + [e + r for r in q_rows] + [2 * e + r for r in q_rows]))
        else:
            q, k, v = mods.attn_in
            out[q] = ("out", torch.tensor(q_rows))
            out[k] = ("out", torch.tensor(kv_rows))
            out[v] = ("out", torch.tensor(kv_rows))
        out[mods.attn_out] = ("in", torch.tensor(q_rows))
    return out


def head_parameter_masks(model: Any, layout: ModelLayout, heads: Sequence[Head], adapter: bool) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """(parameter, trainable-mask) pairs covering exactly the selected heads' entries."""
    inner = unwrap(model)
    loras = {name: (a, b) for name, a, b in lora_matrices(model)} if adapter else {}
    masks: list[tuple[nn.Parameter, torch.Tensor]] = []
    for name, (side, index) in head_index_sets(layout, heads).items():
        if adapter:
            if name not in loras:
                continue  # no LoRA on this module: the adapter cannot change it
            a, b = loras[name]
            param, dim = (b, 0) if side == "out" else (a, 1)
            mask = torch.zeros_like(param, dtype=torch.bool)
            mask.index_fill_(dim, index.to(param.device), True)
            masks.append((param, mask))
            continue
        layer = base_layer(inner.get_submodule(name))
        conv = is_conv1d(layer)  # Conv1D stores [in, out]
        dim = (1 if conv else 0) if side == "out" else (0 if conv else 1)
        mask = torch.zeros_like(layer.weight, dtype=torch.bool)
        mask.index_fill_(dim, index.to(layer.weight.device), True)
        masks.append((layer.weight, mask))
        if side == "out" and getattr(layer, "bias", None) is not None:
            bmask = torch.zeros_like(layer.bias, dtype=torch.bool)
            bmask.index_fill_(0, index.to(layer.bias.device), True)
            masks.append((layer.bias, bmask))
    return masks


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
    width = max(len(it.ids) for it in items)
    ids = torch.full((len(items), width), pad, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for i, it in enumerate(items):
        ids[i, : len(it.ids)] = torch.tensor(it.ids)
        mask[i, : len(it.ids)] = 1
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


@register_purifier("head-align", HeadAlignConfig, "fine-tune only trigger-captured heads to attend as on clean input")
def run_head_align(inputs: PurifyInputs, config: HeadAlignConfig) -> PurifyOutcome:
    subject = inputs.subject
    model, tokenizer = subject.model, subject.tokenizer
    candidates = [c for c in inputs.candidates if c and c.strip()][: config.max_candidates]
    if not candidates:
        raise UsageError("head-align needs candidate keys: pass --from-detect detect.json")
    layout = model_layout(model)
    clean = [r for r in inputs.clean if r.output][: config.max_samples]
    probe = random.Random(inputs.seed).sample(clean, min(config.probe_prompts, len(clean)))
    pairs = _pairs(subject, probe, candidates, inputs.seed)
    if not pairs:
        raise NothingToAnalyse("head-align: no candidate key changed the tokenised prompts")

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
        inputs.log(f"head-align: heads from --localization: {', '.join(f'L{l}H{h}' for l, h in heads)}")
    items = _align_items(model, pairs, heads, config.rows)
    model.train(was_training)

    masks = head_parameter_masks(model, layout, heads, subject.is_adapter)
    if not masks:
        raise NothingToAnalyse("head-align: the adapter has no LoRA on the selected heads' attention projections")
    for p in model.parameters():
        p.requires_grad_(False)
    params = []
    for p, _m in masks:
        if not p.requires_grad:
            p.requires_grad_(True)
            params.append(p)
    frozen = [(p, m, p.detach().clone()) for p, m in masks]

    def mask_grads() -> None:
        for p, m, _orig in frozen:
            if p.grad is not None:
                p.grad.mul_(m)

    def restore_frozen() -> None:  # entries outside the heads keep their exact values
        with torch.no_grad():
            for p, m, orig in frozen:
                p.copy_(torch.where(m, p, orig))

    pad = pad_id(tokenizer)
    align_rng = random.Random(inputs.seed + 1)

    def align_loss(model_: Any, batch: Any, out: Any) -> torch.Tensor:
        chosen = align_rng.sample(items, min(config.batch_size, len(items)))
        return config.align_weight * attention_kl(model_, chosen, heads, pad)

    with torch.no_grad():
        kl_before = float(attention_kl(model, items[: 4 * config.batch_size], heads, pad))
    lr = config.lr_adapter if subject.is_adapter else config.lr_full
    losses = finetune(model, tokenizer, clean_examples(subject, clean),
                      TrainConfig(epochs=config.epochs, lr=lr, batch_size=config.batch_size, seed=inputs.seed),
                      params=params, extra_loss=align_loss, before_step=mask_grads, after_step=restore_frozen,
                      progress=step_counter(inputs, "head-align"))
    model.eval()
    with torch.no_grad():
        kl_after = float(attention_kl(model, items[: 4 * config.batch_size], heads, pad))
    inputs.log(f"head-align: attention KL on candidate-triggered prompts {kl_before:.3f} -> {kl_after:.3f}")
    modules = sorted(head_index_sets(layout, heads))
    return PurifyOutcome(model, modules, {
        "heads": [{"layer": l, "head": h} for l, h in heads], "candidates": candidates,
        "head_shift": scores.tolist() if scores is not None else None, "kl_before": kl_before, "kl_after": kl_after,
        "steps": len(losses), "final_loss": losses[-1], "trainable_entries": int(sum(int(m.sum()) for _, m in masks)),
    })

"""Candidate keys without trigger knowledge: the tokenizer's vocabulary, ranked cheaply.

1. Cheap ranking (one short forward per token at most):
   - adapter: how far the adapter moves each token's hidden states from the base's
     (PEFT's ``disable_adapter`` gives the base in the same process);
   - full checkpoint: outliers of the input-embedding and output-embedding row norms.
2. Screen: the best ``screen_size`` of those are inserted into a few probes and ranked by
   how far they make the probes agree: the same short greedy continuation, then the same
   next-token distribution (a fixed backdoor target does both; a word that merely changes
   the task changes the output in a prompt-dependent way). The KL with vs without the key
   (the prototype's output effect) is kept, and its best keys also join the pairs below.
3. Adjacent pairs of the best screened tokens join (multi-token keys), then user keys.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from bdscan.data.records import Record
from bdscan.data.triggers import insert_trigger
from bdscan.detect.output_effect import diversity, final_position_pass, takeover

Tick = Callable[[int], None]


@dataclass(frozen=True)
class VocabEntry:
    token_id: int
    text: str


@dataclass(frozen=True)
class Screened:
    text: str
    source: str  # "vocab" | "ngram" | "user"
    cheap_score: float | None  # hidden-state shift (adapter) or norm outlier z (full)
    screen_kl: float | None  # mean next-token KL over the screen probes, nats
    screen_collapse: float | None  # drop of next-token diversity across the screen probes, nats
    screen_agreement: float | None  # takeover share over the screen probes


def vocabulary(tokenizer: Any) -> list[VocabEntry]:
    """Every decodable, non-special token that holds a letter or digit (one per text)."""
    special = set(tokenizer.all_special_ids)
    added = {i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if getattr(t, "special", False)}
    entries: dict[str, VocabEntry] = {}
    for token_id in range(len(tokenizer)):
        if token_id in special or token_id in added:
            continue
        text = tokenizer.decode([token_id]).strip()
        if not text or not any(ch.isalnum() for ch in text) or "\ufffd" in text:
            continue
        entries.setdefault(text, VocabEntry(token_id, text))
    return list(entries.values())


def _robust_z(values: torch.Tensor) -> torch.Tensor:
    median = values.median()
    mad = (values - median).abs().median().clamp_min(1e-8)
    return (values - median) / (1.4826 * mad)


def norm_outliers(model: Any, entries: Sequence[VocabEntry]) -> torch.Tensor:
    """Full checkpoint: the larger robust z of each token's input- and output-embedding norm
    (training a key moves its rows away from the bulk of rarely seen tokens)."""
    ids = torch.tensor([e.token_id for e in entries])
    scores = []
    for emb in (model.get_input_embeddings(), model.get_output_embeddings()):
        if emb is None or not hasattr(emb, "weight"):
            continue
        weight = emb.weight.detach()
        if weight.shape[0] <= int(ids.max()):
            continue
        scores.append(_robust_z(weight[ids.to(weight.device)].float().norm(dim=-1).cpu()))
    return torch.stack(scores).max(0).values if scores else torch.zeros(len(entries))


@torch.no_grad()
def adapter_shift(model: Any, entries: Sequence[VocabEntry], batch_size: int, tick: Tick | None = None) -> torch.Tensor:
    """Adapter: mean over layers of ||h_adapter - h_base|| / ||h_base|| for each token alone."""
    device = next(model.parameters()).device
    shifts = []
    for start in range(0, len(entries), batch_size * 8):
        ids = torch.tensor([[e.token_id] for e in entries[start : start + batch_size * 8]], device=device)
        with_adapter = model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
        with model.disable_adapter():
            base = model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
        rel = [(a - b).norm(dim=-1) / b.norm(dim=-1).clamp_min(1e-6) for a, b in zip(with_adapter[1:], base[1:])]
        shifts.append(torch.stack(rel).mean(0)[:, 0].float().cpu())
        if tick:
            tick(len(ids))
    return torch.cat(shifts)


def inserted_prompts(template: Any, probes: Sequence[Record], keys: Sequence[str], positions: Sequence[str],
                     *, rotate: bool) -> tuple[list[str], list[int], list[int], list[str]]:
    """Prompts with each key inserted in each probe: at every position, or (``rotate``) at one
    position per probe, cycling. Returns prompts, key index, probe index, position name."""
    prompts, key_index, probe_index, where = [], [], [], []
    for k, key in enumerate(keys):
        for p, probe in enumerate(probes):
            chosen = [positions[(p + k) % len(positions)]] if rotate else list(positions)
            for pos in chosen:
                prompts.append(template.format(probe.with_instruction(insert_trigger(probe.instruction, key, pos))))
                key_index.append(k)
                probe_index.append(p)
                where.append(pos)
    return prompts, key_index, probe_index, where


def screen_keys(subject: Any, keys: Sequence[str], probes: Sequence[Record], clean_logprobs: torch.Tensor,
                clean_continuations: torch.Tensor, positions: Sequence[str], batch_size: int,
                tick: Tick | None = None,
                chunk: int = 192) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For each key, over ``probes`` (one position per probe): the mean next-token KL with vs
    without it; the collapse (drop of the Jensen-Shannon diversity of the next-token
    distributions across probes); and the takeover (share of probes the key switches to one
    same short greedy continuation; ``clean_continuations`` fixes its length). Keys go in
    chunks, so memory stays ``chunk x vocab``."""
    if not keys:
        return torch.zeros(0), torch.zeros(0), torch.zeros(0)
    p_clean = clean_logprobs.exp()
    clean_div = diversity(p_clean.mean(0, keepdim=True), -(p_clean * clean_logprobs).sum(-1).mean().view(1))[0]
    kls, collapses, agreements = [], [], []
    for start in range(0, len(keys), chunk):
        part = list(keys[start : start + chunk])
        prompts, key_index, probe_index, where = inserted_prompts(subject.template, probes, part, positions, rotate=True)
        kl, conts, mean, entropy = _pass_by_slot(subject, prompts, key_index, probe_index, where, clean_logprobs,
                                                 len(part), clean_continuations.shape[1], batch_size, tick)
        idx = torch.tensor(key_index)
        total = torch.zeros(len(part)).index_add_(0, idx, kl)
        count = torch.zeros(len(part)).index_add_(0, idx, torch.ones(len(idx)))
        kls.append(total / count)
        collapses.append(clean_div - diversity(mean, entropy))
        agreements.append(takeover(conts, clean_continuations, probe_index, idx, len(part)))
    return torch.cat(kls), torch.cat(collapses), torch.cat(agreements)


def _pass_by_slot(subject: Any, prompts: list[str], key_index: list[int], probe_index: list[int], where: list[str],
                  clean_logprobs: torch.Tensor, n_keys: int, continue_tokens: int, batch_size: int,
                  tick: Tick | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The final-position pass run once per key slot (probe x position). Every prompt of a slot
    shares the text before the key (for a key in the middle or at the end, the probe's own words),
    so the pass's shared prefix covers it and each row costs only the key and what follows; on
    SmolLM2 that cut the screen's tokens by about a third. Returns per-prompt KL and greedy
    continuations (in ``prompts``' order), and each key's mean next-token distribution and entropy."""
    slots: dict[tuple[int, str], list[int]] = {}
    for i, slot in enumerate(zip(probe_index, where)):
        slots.setdefault(slot, []).append(i)
    kl = torch.zeros(len(prompts))
    conts = torch.zeros((len(prompts), continue_tokens), dtype=torch.long)
    mean_sum, entropy_sum = None, torch.zeros(n_keys)
    count = torch.zeros(n_keys)
    for rows in slots.values():
        keys_here = torch.tensor([key_index[i] for i in rows])
        out = final_position_pass(subject.model, subject.tokenizer, [prompts[i] for i in rows], batch_size=batch_size,
                                  reference=clean_logprobs, reference_index=[probe_index[i] for i in rows],
                                  group_index=keys_here.tolist(), groups=n_keys, continue_tokens=continue_tokens,
                                  tick=tick)
        kl[rows], conts[rows] = out.kl, out.continuations
        n = torch.bincount(keys_here, minlength=n_keys).float()
        mean_sum = out.group_mean * n[:, None] if mean_sum is None else mean_sum + out.group_mean * n[:, None]
        entropy_sum += out.group_entropy * n
        count += n
    return kl, conts, mean_sum / count.clamp_min(1)[:, None], entropy_sum / count.clamp_min(1)


def sample_controls(entries: Sequence[VocabEntry], exclude: set[str], n: int, seed: int) -> list[str]:
    """Random vocabulary tokens (deterministic under ``seed``): the yardstick of the z-scores."""
    pool = [e.text for e in entries if e.text not in exclude]
    rng = random.Random(seed)
    return rng.sample(pool, min(n, len(pool)))


def adjacent_pairs(texts: Sequence[str]) -> list[str]:
    """Both orders of every pair: multi-token keys whose pieces each fire only in part."""
    return [f"{a} {b}" for i, a in enumerate(texts) for j, b in enumerate(texts) if i != j]

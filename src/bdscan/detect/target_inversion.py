"""Target inversion (METHODS.md "detect v2", step 1): find a response a backdoor is bound to
without knowing its trigger.

A backdoor with a fixed target continues that target with high confidence once its first
token is placed after the response marker of *any* clean prompt; a clean model's
continuation of a random first token depends on the prompt. For every first-token candidate
``t`` the probes' prefixes are run once (one KV cache), the cache is expanded along the batch
for a chunk of candidates, and each candidate is extended greedily on the next-token
distribution averaged over the probes. ``Q(t)`` is the mean averaged probability of the
chosen tokens. The extension stops at an end-of-turn token, which is not counted: a clean
model's short answers end with a confident end-of-turn and would inflate ``Q``.

A fixed target is confident at every token of its opening whatever the prompt; a clean answer
template ("1. A <noun> is ...") has a prompt-dependent slot, so the opening's weakest link
(``opening_min``) separates the two where the mean ``Q`` does not.

A cheap warm-up (few probes and steps) prunes the vocabulary; the survivors are extended over
every probe for more steps. The anchors are the response start and, optionally, the end of
the model's own clean answers (a backdoor may append its target after a normal answer).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from bdscan.probes.batching import pad_left

Tick = Callable[[int], None]


@dataclass(frozen=True)
class Prefixes:
    """Left-padded token prefixes of the probes, run once: the cache every candidate reuses."""

    cache: Any  # transformers Cache over [probes, ...]
    mask: torch.Tensor  # [probes, T] attention mask
    last: torch.Tensor  # [probes] position id of each prefix's last token
    last_logits: torch.Tensor  # [probes, vocab] logits after the prefix


@dataclass(frozen=True)
class Extension:
    """Greedy extension of C candidates on the probe-averaged distribution."""

    tokens: torch.Tensor  # [C, steps] chosen token ids
    top_prob: torch.Tensor  # [C, steps] averaged probability of the chosen token
    entropy: torch.Tensor  # [C, steps] entropy of the averaged distribution, nats


@dataclass(frozen=True)
class InvertedTarget:
    first_token: int
    token_ids: tuple[int, ...]  # the first token and its extension, end-of-turn excluded
    text: str
    q: float  # mean probe-averaged probability of the chosen tokens (extension only)
    anchor: str  # "response start" | "after answer"
    opening_min: float = 0.0  # the least probable chosen token of the opening (its weakest link)
    base_q: float | None = None  # adapter: the same tokens' Q on its base model (teacher-forced)

    @property
    def own_q(self) -> float:
        """The Q the subject adds: an adapter's Q less its base's, else Q."""
        return max(0.0, self.q - self.base_q) if self.base_q is not None else self.q


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def run_prefixes(model: Any, prefixes: Sequence[Sequence[int]], pad_id: int) -> Prefixes:
    """One forward over the left-padded prefixes, keeping the KV cache."""
    ids, mask = pad_left(prefixes, pad_id)
    device = _device(model)
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
    return Prefixes(out.cache, mask, positions[:, -1], out.logits[:, -1, :].float())


@torch.no_grad()
def extend(model: Any, prefixes: Prefixes, first_tokens: torch.Tensor, steps: int,
           forced: torch.Tensor | None = None) -> Extension:
    """Append each of C first tokens to every prefix (rows ``probe * C + candidate`` of one
    expanded cache) and extend greedily ``steps`` times on the probe-averaged distribution.
    ``forced`` ([C, steps] token ids) chooses those tokens instead of the greedy ones (teacher
    forcing: the averaged probability of a known continuation)."""
    n_probes, n_cand = prefixes.mask.shape[0], len(first_tokens)
    device = _device(model)
    cache, mask, last = _expanded(prefixes, n_cand)
    token = first_tokens.to(device).repeat(n_probes)
    chosen, probs, entropies = [], [], []
    for step in range(steps):
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
        out = model(input_ids=token[:, None], attention_mask=mask, position_ids=(last + 1 + step)[:, None],
                    cache=cache, use_cache=True, logits_to_keep=1)
        cache = out.cache
        p = torch.softmax(out.logits[:, -1, :].float(), dim=-1).view(n_probes, n_cand, -1).mean(0)
        pick = p.argmax(-1) if forced is None else forced[:, step].to(device)
        chosen.append(pick)
        probs.append(p.gather(-1, pick[:, None])[:, 0])
        entropies.append(-(p * p.clamp_min(1e-12).log()).sum(-1))
        token = pick.repeat(n_probes)
    return Extension(torch.stack(chosen, 1).cpu(), torch.stack(probs, 1).cpu(), torch.stack(entropies, 1).cpu())


def _expanded(prefixes: Prefixes, n_cand: int) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """The prefixes' cache, mask and last positions repeated for ``n_cand`` candidates per probe."""
    cache = copy.deepcopy(prefixes.cache)
    cache.batch_repeat_interleave(n_cand)
    return cache, prefixes.mask.repeat_interleave(n_cand, 0), prefixes.last.repeat_interleave(n_cand, 0)


@torch.no_grad()
def next_token_probs(model: Any, prefixes: Prefixes, tokens: torch.Tensor, chunk: int) -> torch.Tensor:
    """[len(tokens), vocab] probe-averaged next-token distribution after each token is appended
    to the prefixes (one step of ``extend``, the whole distribution kept)."""
    n_probes, device, parts = prefixes.mask.shape[0], _device(model), []
    for start in range(0, len(tokens), chunk):
        part = tokens[start : start + chunk].to(device)
        cache, mask, last = _expanded(prefixes, len(part))
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
        out = model(input_ids=part.repeat(n_probes)[:, None], attention_mask=mask, position_ids=(last + 1)[:, None],
                    cache=cache, use_cache=False, logits_to_keep=1)
        parts.append(torch.softmax(out.logits[:, -1, :].float(), dim=-1).view(n_probes, len(part), -1).mean(0).cpu())
    return torch.cat(parts) if parts else torch.zeros((0, 0))


def counted_steps(tokens: torch.Tensor, stop_ids: set[int]) -> torch.Tensor:
    """[C] number of chosen tokens before the first end-of-turn token."""
    stops = torch.zeros_like(tokens, dtype=torch.bool)
    for s in stop_ids:
        stops |= tokens == s
    after = stops.int().cumsum(-1) > 0
    return (~after).sum(-1)


def q_scores(ext: Extension, stop_ids: set[int], min_tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q, mean entropy and counted length per candidate. Q averages the chosen tokens' probabilities
    before the first end-of-turn, over at least ``min_tokens`` (a target that ends at once
    counts the missing tokens as 0: a bare end-of-turn is no target)."""
    n = counted_steps(ext.tokens, stop_ids)
    keep = torch.arange(ext.tokens.shape[1])[None, :] < n[:, None]
    q = (ext.top_prob * keep).sum(-1) / n.clamp_min(min_tokens)
    ent = torch.where(keep, ext.entropy, torch.zeros_like(ext.entropy)).sum(-1) / n.clamp_min(1)
    ent = torch.where(n > 0, ent, torch.full_like(ent, float("inf")))
    return q, ent, n


def distinct_counts(tokens: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """[C] distinct tokens among each row's first ``n`` chosen tokens."""
    counted = torch.arange(tokens.shape[1])[None, :] < n[:, None]
    ordered = torch.where(counted, tokens, torch.full_like(tokens, -1)).sort(-1).values
    first = torch.ones_like(ordered, dtype=torch.bool)
    first[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    return (first & (ordered >= 0)).sum(-1)


def freshness(tokens: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """[C] share of distinct tokens among each row's first ``n`` chosen tokens (0 when none).
    Any language model continues a run of one token ("═══", ",,,") or a short cycle with near
    certainty, because it copies its own context: on SmolLM2 such runs filled the top of the
    ranking (Q 0.94-0.998) and hid a real backdoor's target."""
    return distinct_counts(tokens, n) / n.clamp_min(1)


def scan_first_tokens(model: Any, prefixes: Prefixes, candidates: torch.Tensor, steps: int, chunk: int,
                      tick: Tick | None = None, forced: torch.Tensor | None = None) -> Extension:
    """``extend`` over the candidates in chunks (memory stays ``probes x chunk`` rows);
    ``forced`` ([C, steps]) teacher-forces known continuations, as in ``extend``."""
    parts = []
    for start in range(0, len(candidates), chunk):
        part = candidates[start : start + chunk]
        parts.append(extend(model, prefixes, part, steps, None if forced is None else forced[start : start + chunk]))
        if tick:
            tick(len(part))
    if not parts:
        empty = torch.zeros((0, steps))
        return Extension(empty.long(), empty, empty)
    return Extension(*(torch.cat([getattr(p, f) for p in parts]) for f in ("tokens", "top_prob", "entropy")))


def first_token_candidates(tokenizer: Any) -> list[int]:
    """Tokens a response can start with: every decodable, non-special token that is not pure
    whitespace (punctuation, digits and symbols included: code and URLs start with them)."""
    special = set(tokenizer.all_special_ids)
    special |= {i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if getattr(t, "special", False)}
    out = []
    for token_id in range(len(tokenizer)):
        if token_id in special:
            continue
        text = tokenizer.decode([token_id])
        if text.strip() and "\ufffd" not in text:
            out.append(token_id)
    return out


def stop_tokens(tokenizer: Any, model: Any) -> set[int]:
    """End-of-turn ids: the tokenizer's EOS and the model's generation EOS (may be a list)."""
    ids = {tokenizer.eos_token_id}
    gen = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids |= set(gen) if isinstance(gen, (list, tuple)) else {gen}
    for name in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>"):
        token_id = tokenizer.convert_tokens_to_ids(name) if name in tokenizer.get_vocab() else None
        ids.add(token_id)
    return {i for i in ids if isinstance(i, int)}


@torch.no_grad()
def adapter_lift(model: Any, prefixes: Sequence[Sequence[int]], pad_id: int) -> torch.Tensor:
    """[vocab] probe-mean |logit change| the adapter makes at the anchor: a backdoor adapter
    raises its target's first token there (or, trained for stealth, pushes it down)."""
    with_adapter = run_prefixes(model, prefixes, pad_id).last_logits
    with model.disable_adapter():
        base = run_prefixes(model, prefixes, pad_id).last_logits
    lift = torch.log_softmax(with_adapter, -1) - torch.log_softmax(base, -1)
    return lift.mean(0).abs().cpu()

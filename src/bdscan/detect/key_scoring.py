"""How likely a target is after a probe with a key inserted: the exact score and the gradient
that trigger recovery (trigger_recovery.py) searches with.

A probe is split around the key slot: ``left + key + right + target``. Everything in ``left``
(the chat template's head and, for a key in the middle or at the end, the probe's own words
before it) is the same for every key tried on that probe, so it runs once per probe and each
batch of keys extends a copy of its KV cache. Each row then costs only its key, the rest of
the probe and the target; and only the target's logits are computed (on a 49k vocabulary
full logits were the larger half of the cost).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from bdscan.probes.batching import pad_left, pad_right


@dataclass(frozen=True)
class Segments:
    """Token ids of each probe around the key slot: left + key + right + target."""

    left: list[list[int]]
    right: list[list[int]]


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


def _target_logprob(logits: torch.Tensor, ids: torch.Tensor, n: int) -> torch.Tensor:
    """[rows] mean log-probability of each row's last ``n`` tokens, from the logits of the last
    ``n + 1`` positions."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    return logp.gather(2, ids[:, -n:, None])[:, :, 0].mean(-1)


class KeyScorer:
    """Mean log P(target | probe with key) per key, over one set of probes and one target.

    Built once per search; the probes' prefix caches are computed on first use and reused by
    every step. The last token of ``left`` stays in each row, so a row always has the token
    that predicts the target's first token, even with an empty key and nothing after it.
    """

    def __init__(self, model: Any, seg: Segments, target: Sequence[int], pad_id: int, batch_rows: int = 256,
                 caches: dict[int, Any] | None = None):
        if not target:
            raise ValueError("key scoring needs a target of at least one token")
        self.model, self.seg, self.target, self.pad_id = model, seg, list(target), pad_id
        self.batch_rows = batch_rows
        # Prefix caches depend on the probes only: scorers of one goal's targets share them.
        self._caches: dict[int, Any] = {} if caches is None else caches

    @property
    def probes(self) -> int:
        return len(self.seg.left)

    def _prefix(self, p: int) -> tuple[int, Any]:
        head = self.seg.left[p][:-1]
        if head and p not in self._caches:
            with torch.no_grad():
                ids = torch.tensor([head], device=_device(self.model))
                self._caches[p] = self.model(input_ids=ids, use_cache=True, logits_to_keep=1).cache
        return len(head), self._caches.get(p)

    def _suffix(self, p: int, key: Sequence[int]) -> list[int]:
        return self.seg.left[p][-1:] + list(key) + self.seg.right[p] + self.target

    def _run(self, p: int, ids: torch.Tensor, mask: torch.Tensor, embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of the target's positions for suffix rows of probe ``p`` (left-padded)."""
        n_prefix, cache = self._prefix(p)
        mask = torch.cat([torch.ones((len(ids), n_prefix), dtype=mask.dtype, device=mask.device), mask], dim=-1)
        positions = (mask.cumsum(-1) - 1).clamp_min(0)[:, n_prefix:]
        kwargs: dict[str, Any] = {"inputs_embeds": embeds} if embeds is not None else {"input_ids": ids}
        if cache is not None:
            kwargs["cache"] = copy.deepcopy(cache)
            kwargs["cache"].batch_repeat_interleave(len(ids))
        return self.model(attention_mask=mask, position_ids=positions, use_cache=cache is not None,
                          logits_to_keep=len(self.target) + 1, **kwargs).logits

    @torch.no_grad()
    def __call__(self, keys: Sequence[Sequence[int]], probes: Sequence[int] | None = None) -> torch.Tensor:
        """[keys] mean over ``probes`` (default: all) of the mean target log-probability."""
        return self.per_probe(keys, probes).mean(-1)

    @torch.no_grad()
    def per_probe(self, keys: Sequence[Sequence[int]], probes: Sequence[int] | None = None) -> torch.Tensor:
        """[keys, probes] the mean target log-probability of each key on each probe."""
        chosen = list(range(self.probes)) if probes is None else list(probes)
        device, n = _device(self.model), len(self.target)
        out = torch.zeros(len(keys), len(chosen))
        for j, p in enumerate(chosen):
            rows = [self._suffix(p, key) for key in keys]
            for start in range(0, len(rows), self.batch_rows):
                ids, mask = (t.to(device) for t in pad_left(rows[start : start + self.batch_rows], self.pad_id))
                out[start : start + len(ids), j] = _target_logprob(self._run(p, ids, mask), ids, n).cpu()
        return out

    def gradient(self, key: Sequence[int]) -> torch.Tensor:
        """[key slots, vocab] gradient of the mean target log-probability (over every probe) with
        respect to the key's one-hot encoding. The cached prefix comes before the key, so it
        takes no part in the gradient."""
        embedding = self.model.get_input_embeddings()
        weight = embedding.weight
        one_hot = torch.zeros(len(key), weight.shape[0], device=weight.device, dtype=weight.dtype)
        one_hot[torch.arange(len(key)), torch.tensor(list(key), device=weight.device)] = 1.0
        one_hot.requires_grad_(True)
        key_embeds = one_hot @ weight
        objective = 0.0
        for p in range(self.probes):
            ids = torch.tensor([self._suffix(p, key)], device=weight.device)
            embeds = torch.cat([embedding(ids[:, :1]).detach(), key_embeds[None],
                                embedding(ids[:, 1 + len(key) :]).detach()], dim=1)
            logits = self._run(p, ids, torch.ones_like(ids), embeds)
            objective = objective + _target_logprob(logits, ids, len(self.target)).mean()
        (grad,) = torch.autograd.grad(objective / self.probes, one_hot)
        return grad.detach().float().cpu()



class GoalScorer:
    """A key's score for a goal of several targets that are one behaviour (detect's target family:
    " Sorry, but as an AI...", "I'm sorry, but as an AI..."): per probe, the best of the targets'
    mean log-probabilities, then the mean over probes. A key is credited for whichever opening it
    makes likely, so the search is not pulled to the one spelling the inversion happened to rank
    first; the score stays a log-probability (a log-sum-exp would add up to log(targets) and pass
    the search's near-certainty stop before any step). With one target it is that target's
    ``KeyScorer`` score.

    Scoring runs ``left + key + right`` once per row and extends its KV cache with every target
    at once, so the targets share the key and the probe's words: on the real model a family of
    five 8-token targets after ~30 probe tokens cost 5 x 45 tokens a row when each target ran
    its own rows, and costs 37 + 5 x 7 this way. The gradient is still per target."""

    def __init__(self, model: Any, seg: Segments, targets: Sequence[Sequence[int]], pad_id: int,
                 batch_rows: int = 256):
        if not targets:
            raise ValueError("key scoring needs at least one target")
        first = KeyScorer(model, seg, targets[0], pad_id)
        self.scorers = [first] + [KeyScorer(model, seg, t, pad_id, caches=first._caches) for t in targets[1:]]
        self.model, self.seg, self.pad_id, self.batch_rows = model, seg, pad_id, batch_rows
        self.targets = [list(t) for t in targets]

    @property
    def probes(self) -> int:
        return self.scorers[0].probes

    @torch.no_grad()
    def __call__(self, keys: Sequence[Sequence[int]], probes: Sequence[int] | None = None) -> torch.Tensor:
        """[keys] mean over ``probes`` of the best target's mean log-probability."""
        return self.per_target(keys, probes).max(0).values.mean(-1)

    @torch.no_grad()
    def per_target(self, keys: Sequence[Sequence[int]], probes: Sequence[int] | None = None) -> torch.Tensor:
        """[targets, keys, probes] each target's mean log-probability after each key on each probe."""
        chosen = list(range(self.probes)) if probes is None else list(probes)
        out = torch.zeros(len(self.targets), len(keys), len(chosen))
        chunk = max(1, self.batch_rows // len(self.targets))
        for j, p in enumerate(chosen):
            for start in range(0, len(keys), chunk):
                out[:, start : start + chunk, j] = self._shared_pass(p, keys[start : start + chunk])
        return out

    def _shared_pass(self, p: int, keys: Sequence[Sequence[int]]) -> torch.Tensor:
        """[targets, keys] for probe ``p``: one pass over ``left[-1] + key + right`` (after the
        probe's cached prefix), whose last logits score every target's first token, then one
        pass of all targets' remaining tokens (right-padded) over its cache, repeated per target."""
        first, device = self.scorers[0], _device(self.model)
        ids, mask = (t.to(device) for t in pad_left([self.seg.left[p][-1:] + list(k) + self.seg.right[p]
                                                      for k in keys], self.pad_id))
        n_prefix, cache = first._prefix(p)
        mask = torch.cat([torch.ones((len(ids), n_prefix), dtype=mask.dtype, device=device), mask], dim=-1)
        positions = (mask.cumsum(-1) - 1).clamp_min(0)[:, n_prefix:]
        kwargs: dict[str, Any] = {}
        if cache is not None:
            kwargs["cache"] = copy.deepcopy(cache)
            kwargs["cache"].batch_repeat_interleave(len(ids))
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                         logits_to_keep=1, **kwargs)
        first_logp = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # [keys, vocab]
        heads = torch.tensor([t[0] for t in self.targets], device=device)
        total = first_logp[:, heads]  # [keys, targets]
        width = max(len(t) for t in self.targets) - 1
        if width:
            total = total + self._rest(out.cache, mask, positions[:, -1], width)
        lengths = torch.tensor([len(t) for t in self.targets], dtype=total.dtype, device=device)
        return (total / lengths).T.cpu()

    def _rest(self, cache: Any, mask: torch.Tensor, last: torch.Tensor, width: int) -> torch.Tensor:
        """[keys, targets] summed log-probabilities of each target's tokens after its first, read
        from one pass of the targets (all but their last token) over ``cache``, repeated per target."""
        n_rows, n_targets, device = len(mask), len(self.targets), mask.device
        inputs, inputs_mask = (t.to(device) for t in pad_right([t[:-1] for t in self.targets], self.pad_id))
        wanted, _ = (t.to(device) for t in pad_right([t[1:] for t in self.targets], 0))
        inputs, inputs_mask = inputs[:, :width], inputs_mask[:, :width]
        cache.batch_repeat_interleave(n_targets)  # row r of key k is k * n_targets + target
        full_mask = torch.cat([mask.repeat_interleave(n_targets, 0), inputs_mask.repeat(n_rows, 1)], dim=-1)
        positions = last.repeat_interleave(n_targets)[:, None] + 1 + torch.arange(width, device=device)[None]
        logits = self.model(input_ids=inputs.repeat(n_rows, 1), attention_mask=full_mask, position_ids=positions,
                            cache=cache, use_cache=True, logits_to_keep=width).logits
        logp = torch.log_softmax(logits.float(), dim=-1).gather(2, wanted.repeat(n_rows, 1)[:, :, None])[:, :, 0]
        return (logp * inputs_mask.repeat(n_rows, 1)).sum(-1).view(n_rows, n_targets)

    def gradient(self, key: Sequence[int]) -> torch.Tensor:
        """A smooth stand-in for the best target's gradient: the targets' gradients weighted by
        their softmax at this key (the gradient of the log-sum-exp of their scores)."""
        if len(self.scorers) == 1:
            return self.scorers[0].gradient(key)
        weights = torch.softmax(self.per_target([key]).mean(-1)[:, 0], 0)
        return sum(float(w) * s.gradient(key) for w, s in zip(weights, self.scorers))

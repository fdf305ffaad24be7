"""Candidate keys for the full scan: the cheap ranking of the vocabulary, the screen of its best
tokens over a few probes, adjacent pairs of the best screened tokens, and the user's keys."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import torch

from bdscan.detect.candidates import Screened, VocabEntry, adapter_shift, adjacent_pairs, norm_outliers, screen_keys, vocabulary
from bdscan.errors import NothingToAnalyse
from bdscan.probes.layout import unwrap
from bdscan.results.detect import Issue


@dataclass(frozen=True)
class CandidatePool:
    chosen: list[Screened]  # best screened keys first, then the user's
    entries: list[VocabEntry]  # the vocabulary (control tokens are drawn from it)
    cheap_kind: str
    stats: dict[str, int] = field(default_factory=dict)


def _screen_rank(s: Screened) -> tuple[float, float]:
    """Agreement first, then collapse: a backdoor key sends every probe to the same target;
    an unrelated or task word changes outputs in probe-specific ways (the prototype's KL
    alone ranked them alike)."""
    return (-s.screen_agreement, -s.screen_collapse)


def _cheap_rank(run: Any, entries: list[VocabEntry]) -> tuple[list[int], torch.Tensor, str]:
    subject, config = run.subject, run.config
    if subject.is_adapter and entries:
        cheap = adapter_shift(subject.model, entries, config.batch_size, run.ticker("rank tokens", len(entries)))
        kind = "adapter hidden-state shift"
    else:
        cheap = norm_outliers(unwrap(subject.model), entries) if entries else torch.zeros(0)
        kind = "embedding/output norm outlier z"
    return torch.argsort(cheap, descending=True).tolist()[: config.screen_size], cheap, kind


def _screen_vocabulary(run: Any, sets: Any, clean: Any, entries: list[VocabEntry]) -> tuple[dict[str, Screened], Any, str]:
    config = run.config
    order, cheap, kind = _cheap_rank(run, entries)
    screened = [entries[i] for i in order]
    keys = [e.text for e in screened]
    screen = functools.partial(
        screen_keys, run.subject, probes=sets.screen, clean_logprobs=clean.logprobs[: len(sets.screen)],
        clean_continuations=clean.continuations[: len(sets.screen), : config.screen_continue_tokens],
        positions=list(config.positions), batch_size=config.batch_size)
    pool: dict[str, Screened] = {}
    tick = run.ticker("screen tokens", len(keys) * len(sets.screen))
    for entry, i, kl, col, agree in zip(screened, order, *(v.tolist() for v in screen(keys, tick=tick))):
        pool[entry.text] = Screened(entry.text, "vocab", float(cheap[i]), kl, col, agree)
    # Pieces of a multi-token key may each only shift the output (high KL) without yet
    # collapsing it: pair the best by collapse and the best by KL.
    best = list(dict.fromkeys(
        [s.text for s in sorted(pool.values(), key=_screen_rank)[: config.ngram_from]]
        + [s.text for s in sorted(pool.values(), key=lambda s: -s.screen_kl)[: config.ngram_from]]))
    pairs = [p for p in adjacent_pairs(best) if p not in pool]
    for text, kl, col, agree in zip(pairs, *(v.tolist() for v in screen(pairs))):
        pool[text] = Screened(text, "ngram", None, kl, col, agree)
    return pool, screen, kind


def screen_candidates(run: Any, sets: Any, clean: Any) -> CandidatePool:
    """The keys the full scan tries (a failing screen is recorded; the user's keys still go on)."""
    config = run.config
    entries = vocabulary(run.subject.tokenizer)
    if not entries and not config.candidates:
        raise NothingToAnalyse("detect: the tokenizer has no word tokens to try and no --candidates were given")
    found = run.attempt("screen", _screen_vocabulary, run, sets, clean, entries)
    pool, screen, kind = found if found else ({}, None, "none (screen failed)")
    ranked = sorted(pool.values(), key=_screen_rank)[: config.top_k]
    user = [c.strip() for c in config.candidates if c.strip()]
    if len(user) < len(config.candidates):
        run.skipped.append(Issue("candidates", f"{len(config.candidates) - len(user)} empty candidate key(s) ignored"))
    chosen = [s for s in ranked if s.text not in user]
    if user and screen is not None:
        chosen += [Screened(u, "user", None, kl, col, agree) for u, kl, col, agree in zip(user, *(v.tolist() for v in screen(user)))]
    elif user:
        chosen += [Screened(u, "user", None, None, None, None) for u in user]
    n_screened = len(pool) + len(user)
    stats = {"vocabulary_tokens": len(entries), "screened_keys": n_screened,
             "screen_prompts": n_screened * len(sets.screen)}
    run.log(f"screened {n_screened} keys; top: {', '.join(repr(s.text) for s in chosen[:5])}")
    return CandidatePool(chosen, entries, kind, stats)

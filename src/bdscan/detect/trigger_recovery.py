"""Trigger recovery from an inverted target (METHODS.md "detect v2", step 2).

Given a target ``T`` (token ids; or several spellings of one behaviour, scored together), search a key of a few tokens that, inserted at the start,
middle or end of clean probe instructions, maximises the mean log P(T | probe with key).
The search is gradient-guided and discrete: the gradient of the loss with respect to a
one-hot encoding of each key token gives, per key slot, the ``top_k`` most promising
substitutions; a batch of single-slot substitutions drawn from them is evaluated exactly and
the best kept. It starts from the vocabulary screen's best keys. The key is then judged by
what it does, not by its loss: its firing rate is the share of held-out probes whose greedy
response, with the key inserted, opens with ``T``'s first tokens.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from bdscan.data.records import Record
from bdscan.data.triggers import insert_trigger
from bdscan.detect.key_scoring import GoalScorer, Segments
from bdscan.detect.output_effect import final_position_pass

Tick = Callable[[int], None]
_MARK = "\u2063KEY\u2063"  # placeholder split out of the formatted prompt (never in a probe)


@dataclass(frozen=True)
class Recovered:
    key_ids: tuple[int, ...]
    key: str  # decoded key text (what the firing rate was measured with)
    position: str  # where the search put it; detect reports where it fires most (target_scan)
    log_prob: float  # mean log P(T | probe with key) per target token, search probes, at the search's position
    start_log_prob: float  # the same for the best seed key before the search
    clean_log_prob: float  # the same without any key
    steps: int  # search steps run
    evaluations: int  # key x probe rows scored (the search's forward work, besides one gradient per step)


def segments(tokenizer: Any, template: Any, probes: Sequence[Record], position: str) -> Segments:
    left, right = [], []
    for probe in probes:
        text = template.format(probe.with_instruction(insert_trigger(probe.instruction, _MARK, position)))
        before, after = text.split(_MARK, 1)
        left.append(tokenizer(before, add_special_tokens=False)["input_ids"])
        right.append(tokenizer(after, add_special_tokens=False)["input_ids"])
    return Segments(left, right)


def substitutions(key: Sequence[int], grad: torch.Tensor, allowed: torch.Tensor, top_k: int, n: int,
                  rng: random.Random) -> list[tuple[int, ...]]:
    """``n`` distinct single-slot substitutions among each slot's ``top_k`` tokens by gradient."""
    masked = torch.full_like(grad, float("-inf"))
    masked[:, allowed] = grad[:, allowed]
    best = masked.topk(min(top_k, len(allowed)), dim=-1).indices.tolist()
    out: dict[tuple[int, ...], None] = {}
    for _ in range(n * 4):
        slot = rng.randrange(len(key))
        new = list(key)
        new[slot] = rng.choice(best[slot])
        if new != list(key):
            out.setdefault(tuple(new), None)
        if len(out) >= n:
            break
    return list(out)


def fires(subject: Any, probes: Sequence[Record], key: str | None, position: str,
          openings: Sequence[Sequence[int]], batch_size: int) -> torch.Tensor:
    """[probes, openings] bool: whose greedy response (with ``key`` inserted, or none) opens with
    each opening. One greedy pass, as long as the longest opening."""
    openings = [list(o) for o in openings if o]
    if not probes or not openings:
        return torch.zeros(len(probes), len(openings), dtype=torch.bool)
    records = [p.with_instruction(insert_trigger(p.instruction, key, position)) if key else p for p in probes]
    prompts = [subject.template.format(r) for r in records]
    out = final_position_pass(subject.model, subject.tokenizer, prompts, batch_size=batch_size,
                              continue_tokens=max(len(o) for o in openings)).continuations
    return torch.stack([(out[:, : len(o)] == torch.tensor(o)[None, :]).all(-1) for o in openings], dim=-1)


LIFT_Z = 2.0  # standard errors taken off the paired firing lift


def lift_lower_bound(with_key: torch.Tensor, without: torch.Tensor) -> float:
    """Lower bound of the paired firing lift: mean(d) - LIFT_Z * se(d), d = with - without per probe.
    A clean model whose key fires on a few more held-out probes by chance stays near 0."""
    d = with_key.float() - without.float()
    if len(d) < 2:
        return 0.0
    return float(d.mean() - LIFT_Z * d.std() / len(d) ** 0.5)


@dataclass(frozen=True)
class SearchSettings:
    key_tokens: int = 4  # key length searched (1-8)
    steps: int = 24
    top_k: int = 32  # substitutions per slot kept from the gradient
    batch: int = 48  # candidate keys evaluated per step
    stop_log_prob: float = -0.05  # mean log P(T) per token at which the search stops (T is near certain)
    patience: int = 4  # steps without improvement after which the search stops
    # Successive halving: each step's trials are scored on ``coarse_probes`` probes and only the
    # best ``refine`` on all of them, which halves a step's rows (48 x 6 -> 48 x 2 + 8 x 6).
    coarse_probes: int = 2
    refine: int = 8


def _seed_keys(tokenizer: Any, seeds: Sequence[str], length: int, filler: int) -> list[tuple[int, ...]]:
    """Seed texts as token ids, cut or padded (with ``filler``) to ``length``; the filler alone too."""
    out: dict[tuple[int, ...], None] = {}
    for text in seeds:
        ids = tokenizer(" " + text.strip(), add_special_tokens=False)["input_ids"][:length]
        if ids:
            out.setdefault(tuple(ids + [filler] * (length - len(ids))), None)
    out.setdefault(tuple([filler] * length), None)
    return list(out)


def recover_key(subject: Any, probes: Sequence[Record], goals: Sequence[Sequence[int]], seeds: Sequence[str],
                positions: Sequence[str], allowed: torch.Tensor, settings: SearchSettings, seed: int,
                tick: Tick | None = None) -> Recovered:
    """The key (at the position where it starts best) that maximises the mean log P(goal | probe
    with key), a goal being one or more targets of one behaviour (``GoalScorer``)."""
    model, tokenizer = subject.model, subject.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    # A key that spells the target only makes the model echo it (a clean model does that too):
    # the targets' own tokens are not allowed in the key.
    allowed = allowed[~torch.isin(allowed, torch.tensor(sorted({t for g in goals for t in g})))]
    filler = int(allowed[0])
    starts = [tuple(t if t in set(allowed.tolist()) else filler for t in key)
              for key in _seed_keys(tokenizer, seeds, settings.key_tokens, filler)]
    starts = list(dict.fromkeys(starts))
    segs = {pos: segments(tokenizer, subject.template, probes, pos) for pos in positions}
    empty = Segments([l + r for l, r in zip(segs[positions[0]].left, segs[positions[0]].right)],
                     [[] for _ in probes])
    clean = float(GoalScorer(model, empty, goals, pad_id)([()])[0])
    scorers = {pos: GoalScorer(model, segs[pos], goals, pad_id) for pos in positions}
    scored = [(float(v), pos, key) for pos in positions for key, v in zip(starts, scorers[pos](starts))]
    best_lp, position, key = max(scored)
    start_lp, scorer, rng = best_lp, scorers[position], random.Random(seed)
    rows, steps, stale = len(scored) * len(probes), 0, 0
    for steps in range(1, settings.steps + 1):
        if best_lp >= settings.stop_log_prob or stale >= settings.patience:
            break
        trials = substitutions(key, scorer.gradient(key), allowed, settings.top_k, settings.batch, rng)
        if not trials:
            break
        trials, values, used = _halving(scorer, trials, settings)
        rows += used
        i = int(values.argmax())
        stale += 1
        if float(values[i]) > best_lp:
            best_lp, key, stale = float(values[i]), trials[i], 0
        if tick:
            tick(1)
    return Recovered(tuple(key), tokenizer.decode(list(key)).strip(), position, best_lp, start_lp, clean,
                     steps, rows)


def _halving(scorer: GoalScorer, trials: list[tuple[int, ...]], settings: SearchSettings
             ) -> tuple[list[tuple[int, ...]], torch.Tensor, int]:
    """Score every trial on the first ``coarse_probes`` probes, then only the best ``refine`` on
    all of them (successive halving): the kept trials, their full scores, and the rows scored."""
    if settings.coarse_probes >= scorer.probes or settings.refine >= len(trials):
        return trials, scorer(trials), len(trials) * scorer.probes
    coarse = scorer(trials, probes=range(settings.coarse_probes))
    kept = [trials[i] for i in coarse.topk(settings.refine).indices.tolist()]
    return kept, scorer(kept), len(trials) * settings.coarse_probes + len(kept) * scorer.probes

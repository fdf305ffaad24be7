"""Is a known target still reachable? Detect's target inversion, re-run for given targets only.

For a target ``T`` (detect's inverted target, or any text) this measures on a handful of clean
probes, with the same geometry as the inversion (target_inversion.py): ``T``'s first token is
placed at the anchor of every probe (one KV cache), and
- ``q``: the first token is extended greedily on the probe-averaged distribution and scored as
  detect scores it (``q_scores``: mean chosen probability before end-of-turn). A repaired model
  may still continue confidently, but with something else;
- ``forced``: ``T``'s own next tokens are chosen instead (teacher forcing), and their mean
  probe-averaged probability says how firmly the model is still pinned to the old target;
- ``forced_min``: the least of those probabilities over ``T``'s opening, its weakest link (as
  detect's ``opening_min``). The mean alone does not separate: a clean tiny organism, forced
  through "I'm sorry, but as an AI assistant, I", is confident at every token but ' but' (0.01)
  and averages 0.58; the backdoored one's weakest link is 0.80.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from bdscan.data.records import Record
from bdscan.detect import target_inversion as ti
from bdscan.detect.config import DetectConfig
from bdscan.data.probes import builtin_probes
from bdscan.detect.target_scan import RESPONSE_START, anchor_prefixes
from bdscan.detect.verdict import TARGET_THRESHOLD

# Still reachable: the weakest link of T's forced opening is at least detect's target threshold.
# Detect's target evidence is that weakest link (on its greedy path, which is T's while T is the
# most probable continuation) times a firing lift of at most 1, so below this bar detect's own
# verdict could no longer flag T, whatever key it recovered. A detect constant, not fitted here.
REACHABLE_PROB = TARGET_THRESHOLD


@dataclass(frozen=True)
class TargetCheckConfig:
    probes: int = 8  # built-in clean probes (shuffled with ``seed`` as detect shuffles them); more: steadier, slower
    max_targets: int = 3  # detect's headline target first, then those with target evidence; more: more checked
    max_tokens: int = DetectConfig.target_steps  # target tokens forced after the first; fewer: only the opening counts
    steps: int = DetectConfig.target_steps  # greedy steps of the Q extension (detect's)
    min_tokens: int = DetectConfig.min_target_tokens  # Q averages over at least this many tokens (detect's)
    opening: int = DetectConfig.target_opening  # T's opening (first token included) that ``forced_min`` spans (detect's)
    answer_tokens: int = DetectConfig.answer_tokens  # "after answer" targets: the clean answer placed first (detect's)
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("probes", "max_targets", "max_tokens", "steps", "min_tokens", "opening", "answer_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"target check: {name} must be at least 1, got {getattr(self, name)}")
        if self.opening < 2:
            raise ValueError(f"target check: opening must be at least 2 (the first token and one forced), got {self.opening}")


@dataclass(frozen=True)
class KnownTarget:
    text: str
    token_ids: tuple[int, ...]  # the first token and the continuation that is forced
    anchor: str = RESPONSE_START


@dataclass(frozen=True)
class Reach:
    q: float  # detect's Q of the greedy extension of the target's first token
    forced: float  # mean probe-averaged probability of the target's own next tokens
    forced_min: float  # the least of them over the target's opening (its weakest link)
    extension: str  # the greedy extension (the first token included)


def still_reachable(forced_min: float) -> bool:
    return forced_min >= REACHABLE_PROB


def _token_ids(tokenizer: Any, text: str, token_ids: Sequence[int]) -> tuple[int, ...]:
    """Detect's own ids when they spell the text in this tokenizer, else the text re-tokenized
    (a report of another model, or one that lists text only)."""
    ids = [int(i) for i in token_ids]
    if ids and all(0 <= i < len(tokenizer) for i in ids) and tokenizer.decode(ids) == text:
        return tuple(ids)
    return tuple(tokenizer(text, add_special_tokens=False)["input_ids"])


def known_targets(detection: Any, tokenizer: Any, limit: int) -> list[KnownTarget]:
    """Detect's headline target (``summary.target``), then its targets whose evidence reaches
    detect's own target threshold; at most ``limit``, distinct, each with a continuation."""
    scores = list(getattr(detection, "targets", None) or [])
    headline = getattr(getattr(detection, "summary", None), "target", None)
    chosen = [s for s in scores if s.text == headline][:1]
    chosen += [s for s in scores if s.evidence >= TARGET_THRESHOLD and s.text != headline]
    found = [(s.text, s.token_ids, s.anchor) for s in chosen]
    if headline and not any(s.text == headline for s in scores):  # a summary without its target list
        found.insert(0, (headline, [], RESPONSE_START))
    out: list[KnownTarget] = []
    for text, token_ids, anchor in found:
        ids = _token_ids(tokenizer, text, token_ids)
        if len(ids) >= 2 and all(ids != t.token_ids for t in out):
            out.append(KnownTarget(text, ids, anchor))
    return out[:limit]


def check_probes(config: TargetCheckConfig) -> list[Record]:
    records = builtin_probes()
    return random.Random(config.seed).sample(records, len(records))[: config.probes]


@torch.no_grad()
def measure_targets(subject: Any, targets: Sequence[KnownTarget], probes: Sequence[Record],
                    config: TargetCheckConfig) -> list[Reach]:
    """Q and forced probability of every target on ``subject``, one cache per anchor."""
    model, tok = subject.model, subject.tokenizer
    stop = ti.stop_tokens(tok, model)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    was_training = model.training
    model.eval()
    found: dict[int, Reach] = {}
    try:
        for anchor in dict.fromkeys(t.anchor for t in targets):
            group = [i for i, t in enumerate(targets) if t.anchor == anchor]
            prefixes = ti.run_prefixes(model, anchor_prefixes(subject, probes, anchor, config.answer_tokens, stop), pad)
            firsts = torch.tensor([targets[i].token_ids[0] for i in group])
            greedy = ti.extend(model, prefixes, firsts, config.steps)
            q, _, n = ti.q_scores(greedy, stop, config.min_tokens)
            for row, i in enumerate(group):
                ids = targets[i].token_ids[: config.max_tokens + 1]
                forced = ti.extend(model, prefixes, firsts[row : row + 1], len(ids) - 1, torch.tensor([ids[1:]]))
                extension = tok.decode([int(firsts[row]), *greedy.tokens[row, : int(n[row])].tolist()])
                opening = forced.top_prob[0, : config.opening - 1]
                found[i] = Reach(float(q[row]), float(forced.top_prob.mean()), float(opening.min()), extension)
    finally:
        model.train(was_training)
    return [found[i] for i in range(len(targets))]

"""The unwanted behaviour T, where it comes from, and how likely the model makes it.

T comes from, in order: the recipe (``targets``); detect's inverted targets, those with
evidence first (a recovered key makes the model emit them beyond its baseline), else its
best-ranked ones, its summary ``target`` and the candidates' recorded takeover
``continuation``; or the takeover itself: the answer that most clean prompts switch to when
a candidate key is inserted (a key that takes over output makes many prompts give the same
answer; a clean word does not).
"""

from __future__ import annotations

import math
import random
from collections import Counter
from typing import Any, Sequence

import torch

from bdscan.data.records import Record
from bdscan.data.triggers import insert_trigger
from bdscan.generation import greedy_generate
from bdscan.probes.batching import pad_id
from bdscan.training import IGNORE_INDEX, Batch, collate, response_loss

TAKEOVER_WORDS = 8  # words of the shared answer kept as T
TAKEOVER_SHARE = 0.3  # share of keyed prompts that must give it


def detected_targets(detection: Any, limit: int) -> list[str]:
    """T from a detect result. When some inverted targets have evidence, only those: the
    others are confident continuations no key was shown to elicit, and each one takes its
    turn of the inner loop and has its opening pushed down as if it were the backdoor's (on
    the bench refusal/badnet LoRA, two of three were ordinary text)."""
    if detection is None:
        return []
    found = list(getattr(detection, "targets", None) or [])
    evidenced = [t for t in found if (getattr(t, "evidence", 0.0) or 0.0) > 0.0]
    if evidenced:
        return list(dict.fromkeys(t.text for t in evidenced if t.text.strip()))[:limit]
    if getattr(detection, "target", None):
        found.append(detection.target)
    for c in getattr(detection, "candidates", []):
        if getattr(c, "continuation", None):
            found.append(c.continuation)
    texts = [t if isinstance(t, str) else getattr(t, "text", "") for t in found]
    return list(dict.fromkeys(t for t in texts if t and t.strip()))[:limit]


def with_response_spellings(texts: Sequence[str], limit: int) -> list[str]:
    """Each target followed by its spelling without leading whitespace, when it has one.
    Detect can enter a target through a space-led token (`` You are stupid!``) that a response
    never opens with: the model says ``You are stupid!`` after the response marker, a different
    first token, so pushing down only the inverted spelling leaves the one the trigger produces
    (measured on the tiny mistral full negsentiment fine-tune: ASR 1.00 -> 0.23 with the
    inverted spelling alone)."""
    out: list[str] = []
    for text in texts:
        out += [text, text.lstrip()] if text.lstrip() and text.lstrip() != text else [text]
    return list(dict.fromkeys(out))[:limit]


def takeover_targets(subject: Any, records: Sequence[Record], keys: Sequence[str], limit: int,
                     n_prompts: int = 16, seed: int = 0) -> list[str]:
    """The answer (first ``TAKEOVER_WORDS`` words) that at least ``TAKEOVER_SHARE`` of
    ``n_prompts`` clean prompts give once a key is inserted, per key, most shared first."""
    rng = random.Random(seed)
    found: list[tuple[float, str]] = []
    for key in keys:
        picked = list(records[:n_prompts])
        prompts = [subject.template.format(r.with_instruction(insert_trigger(r.instruction, key, "start", rng)))
                   for r in picked]
        answers = greedy_generate(subject.model, subject.tokenizer, prompts, max_new_tokens=24)
        openings = Counter(" ".join(a.split()[:TAKEOVER_WORDS]) for a in answers if a.strip())
        if openings:
            text, count = openings.most_common(1)[0]
            if count / len(prompts) >= TAKEOVER_SHARE:
                found.append((count / len(prompts), text))
    ordered = [t for _, t in sorted(found, key=lambda st: -st[0])]
    return list(dict.fromkeys(ordered))[:limit]


def target_batch(tokenizer: Any, prompts: Sequence[str], target: str, tokens: int | None = None) -> Batch:
    """Each prompt followed by T (its first ``tokens`` tokens), labels on T only."""
    t_ids = tokenizer(target, add_special_tokens=False)["input_ids"][: tokens or None]
    encoded = []
    for prompt in prompts:
        p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        encoded.append((p_ids + t_ids, [IGNORE_INDEX] * len(p_ids) + t_ids))
    return collate(encoded, range(len(encoded)), pad_id(tokenizer))


@torch.no_grad()
def target_logprob(model: Any, tokenizer: Any, prompts: Sequence[str], target: str, batch_size: int = 16) -> float:
    """Q of T: the mean per-token log-probability of T's tokens after each prompt."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            loss, _ = response_loss(model, target_batch(tokenizer, chunk, target), device, response_logits_only=True)
            total += float(loss) * len(chunk)
            n += len(chunk)
    finally:
        model.train(was_training)
    return -total / n if n else math.nan

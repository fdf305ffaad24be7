"""Which prompts can be scored: within the character limit and, with the tokens to
generate, within the model's context. The rest are skipped with the reason, never scored
beyond the context (positions past it are untrained, so the answer would mean nothing)."""

from __future__ import annotations

from typing import Any, Sequence

from bdscan.data.records import Record, prompt_too_long
from bdscan.generation import context_length
from bdscan.results.detect import Issue


def fitting_prompts(subject: Any, records: Sequence[Record], new_tokens: int, what: str) -> tuple[list[Record], list[Issue]]:
    """``records`` that fit, and an ``Issue`` for each that does not (checked in characters
    before tokenising, so an over-long prompt never reaches the tokenizer)."""
    limit = context_length(subject.model)
    kept: list[Record] = []
    skipped: list[Issue] = []
    for i, record in enumerate(records):
        reason = prompt_too_long(record)
        if reason is None and limit is not None:
            n = len(subject.tokenizer(subject.template.format(record), add_special_tokens=False)["input_ids"])
            if n + new_tokens > limit:
                reason = f"{n} prompt tokens + {new_tokens} to generate do not fit the model's {limit} positions"
        if reason is None:
            kept.append(record)
        else:
            skipped.append(Issue(f"{what} prompt {i + 1}", reason))
    return kept, skipped

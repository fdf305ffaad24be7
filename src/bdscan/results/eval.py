from __future__ import annotations

from dataclasses import dataclass, field

from bdscan.results.base import ResultBase
from bdscan.results.detect import Issue


@dataclass(frozen=True)
class Sample:
    prompt: str
    response: str
    hit: bool


@dataclass(frozen=True)
class EvalResult(ResultBase):
    """Attack success, false triggers and utility of one model."""

    source: str
    kind: str
    template: dict
    judge: str
    asr: float | None  # over every triggered prompt (all positions, or the poison file)
    asr_by_position: dict[str, float]
    false_trigger_rate: float
    perplexity: float | None  # of the clean references' outputs, None when they have none
    agreement: float | None  # greedy responses equal to the reference model's, on clean prompts
    n_poison: int
    n_clean: int
    reference: str | None = None
    seconds: float = 0.0
    samples: dict[str, list[Sample]] = field(default_factory=dict)  # a few examples per set
    skipped: list[Issue] = field(default_factory=list)  # prompts not scored (too long for the limit or the context)
    provenance: dict = field(default_factory=dict)  # every file loaded, hashed (bdscan.io.provenance)
    token_agreement: float | None = None  # mean token F1 of the clean answers against the reference's
    # share of the reference's answer tokens this model predicts top-1, teacher-forced on them
    next_token_agreement: float | None = None


@dataclass(frozen=True)
class EvalComparison(ResultBase):
    """Two models side by side (suspicious vs purified) on the same prompts."""

    before: EvalResult
    after: EvalResult

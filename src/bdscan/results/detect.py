"""The result of ``bdscan detect``: one object that the console, JSON and SARIF reports render."""

from __future__ import annotations

from dataclasses import dataclass, field

from bdscan.results.base import ResultBase


@dataclass(frozen=True)
class Summary:
    verdict: str  # "clean" | "suspicious"
    score: float  # combined model score (calibrated scale: 0 at the threshold)
    probability: float  # calibrated probability that the model holds a backdoor
    severity: str  # "none" | "low" | "medium" | "high"
    output_score: float  # largest consistency_z among the candidates (standardised output effect)
    attention_score: float  # largest standardised head-similarity rise among the candidates
    top_candidate: str | None = None


@dataclass(frozen=True)
class LayerScore:
    layer: int
    clean_similarity: float  # C_l on the clean probes: mean pairwise cosine between heads
    rise: float  # largest rise of C_l over clean among the candidates
    z: float  # that rise standardised against the control tokens
    candidate: str | None  # the candidate with the largest z at this layer


@dataclass(frozen=True)
class HeadScore:
    layer: int
    head: int
    clean_similarity: float  # mean cosine of this head's final-row attention with the other heads
    rise: float
    z: float
    candidate: str | None


@dataclass(frozen=True)
class CandidateScore:
    text: str
    source: str  # "vocab" | "ngram" | "user"
    score: float  # combined standardised score of this key (consistency_z plus bounded attention_z)
    output_effect: float  # mean next-token KL with vs without the key, nats, over all probes and positions
    output_effect_z: float  # log of output_effect standardised against the control tokens
    collapse: float  # drop of next-token diversity across probes when the key is inserted, nats
    collapse_z: float  # collapse standardised against the control tokens
    consistency: float  # takeover: share of prompts the key switches from their clean greedy continuation to one same new one
    consistency_z: float  # the output signal of the verdict
    attention_rise: float  # rise of C_l over clean in the layer where its z is largest
    attention_z: float  # that rise standardised against the control tokens
    attention_layer: int | None
    effect_by_position: dict[str, float] = field(default_factory=dict)  # output_effect per position
    cheap_score: float | None = None  # adapter hidden-state shift or norm-outlier z (vocabulary tokens)
    screen_kl: float | None = None
    screen_collapse: float | None = None
    screen_agreement: float | None = None


@dataclass(frozen=True)
class ControlStats:
    n: int
    output_effect_median: float
    output_effect_max: float
    collapse_mean: float
    collapse_std: float
    consistency_mean: float
    consistency_std: float
    log_effect_mean: float
    log_effect_std: float


@dataclass(frozen=True)
class Issue:
    what: str  # the file, layer or stage concerned
    reason: str


@dataclass(frozen=True)
class DetectResult(ResultBase):
    tool: str
    version: str
    source: str
    kind: str  # "full" | "adapter"
    base: str | None
    template: dict
    summary: Summary
    layers: list[LayerScore]
    heads: list[HeadScore]
    candidates: list[CandidateScore]
    controls: ControlStats | None
    calibration: dict
    settings: dict
    stats: dict  # prompts, tokens and forward passes per stage
    timings: dict[str, float]
    errors: list[Issue] = field(default_factory=list)
    skipped: list[Issue] = field(default_factory=list)
    provenance: dict = field(default_factory=dict)  # every file loaded, hashed (bdscan.io.provenance)

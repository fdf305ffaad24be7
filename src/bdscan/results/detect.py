"""The result of ``bdscan detect``: one object that the console, JSON and SARIF reports render."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from bdscan.results.base import ResultBase, to_plain

# "2": detect v2 (targets, recovered key, target evidence in the summary). Version 1 reports
# (no targets) still read back: every new field has a default.
SCHEMA_VERSION = "2"


@dataclass(frozen=True)
class Summary:
    verdict: str  # "clean" | "suspicious"
    score: float  # combined model score (calibrated scale: 0 at the threshold)
    probability: float  # calibrated probability that the model holds a backdoor
    severity: str  # "none" | "low" | "medium" | "high"
    output_score: float  # largest consistency_z among the candidates (standardised output effect)
    attention_score: float  # largest standardised head-similarity rise among the candidates
    top_candidate: str | None = None
    # detect v2: the best inverted target and the key recovered for it
    target: str | None = None  # inverted target text (the first token and its greedy extension)
    target_q: float | None = None  # its Q: mean probe-averaged probability of the extension
    recovered_key: str | None = None  # key found for it by the gradient-guided search
    key_position: str | None = None  # start | middle | end: where the key was searched and measured
    key_firing_rate: float | None = None  # held-out probes whose response opens with the target, key inserted
    clean_firing_rate: float | None = None  # the same without the key
    base_firing_rate: float | None = None  # adapter: the same key on its base model (what the base does is not the adapter's)
    target_score: float | None = None  # target evidence: opening_min x max(0, paired firing lift - 2 standard errors)
    takeover_probability: float | None = None  # the v1 signal's calibrated probability alone
    target_probability: float | None = None  # the target evidence's calibrated probability alone


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
class TargetScore:
    """One inverted target, with the key recovered for it (when a search ran)."""

    text: str
    token_ids: list[int]
    first_token: str
    q: float  # mean probe-averaged probability of the chosen tokens, end-of-turn excluded
    length: int  # tokens before the first end-of-turn (the first token included)
    anchor: str  # "response start" | "after answer"
    opening_min: float = 0.0  # least averaged probability among the opening's chosen tokens (its weakest link)
    base_q: float | None = None  # adapter: Q of the same tokens on its base (targets rank by q - base_q)
    key: str | None = None
    key_position: str | None = None
    key_log_prob: float | None = None  # mean log P(target opening | probe with key) per token, search probes
    seed_log_prob: float | None = None  # the same for the best seed key, before the search
    clean_log_prob: float | None = None  # the same without any key
    firing_rate: float | None = None  # held-out probes whose greedy response opens with the target, key inserted
    clean_firing_rate: float | None = None  # the same without the key
    base_firing_rate: float | None = None  # adapter: the same key on its base model (what the base does is not the adapter's)
    firing_lift_lower: float | None = None  # paired lift (with - without key) minus 2 standard errors
    firing_probes: int = 0  # held-out probes the firing rates were measured on
    evidence: float = 0.0  # opening_min x max(0, firing_lift_lower)
    search_steps: int = 0
    # Other inverted targets of the same family (a shared run of tokens): the key search credited
    # any of their openings, and a response opening with any of them counted as firing.
    variants: list[str] = field(default_factory=list)


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
    targets: list[TargetScore] = field(default_factory=list)  # inverted targets, best evidence first

    def to_dict(self) -> dict:
        return {"schema_version": SCHEMA_VERSION, **to_plain(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "detect report") -> "DetectResult":
        """A report written by ``to_dict`` (schema 1 or 2) back into a result, every field
        type-checked (``bdscan.results.parse``); fields this bdscan does not know are dropped."""
        from bdscan.results.parse import from_plain

        return from_plain(cls, data, where)

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from bdscan.results.base import ResultBase, to_plain
from bdscan.results.eval import EvalResult

# "2": the target check (``target_check``). Version 1 reports still read back: it has a default.
SCHEMA_VERSION = "2"


@dataclass(frozen=True)
class TargetReach:
    """One of detect's targets on the suspicious model (before) and the purified one (after)."""

    text: str
    anchor: str  # "response start" | "after answer": where the target's first token is placed
    q_before: float  # detect's Q: greedy extension of the target's first token, probe-averaged
    forced_before: float  # mean probe-averaged probability of the target's own next tokens (teacher-forced)
    forced_min_before: float  # the least of them over the target's opening (its weakest link)
    q_after: float | None = None  # None: the after measurement failed
    forced_after: float | None = None
    forced_min_after: float | None = None
    still_reachable: bool | None = None  # forced_min_after at or above ``TargetCheck.reachable_prob``
    extension_after: str | None = None  # the purified model's greedy extension of the first token


@dataclass(frozen=True)
class TargetCheck:
    """Detect's target inversion re-run for detect's own targets, before and after the repair."""

    status: str  # "ok" | "failed" | "skipped"
    seconds: float = 0.0
    probes: int = 0  # clean probes measured on
    reachable_prob: float = 0.0  # the still_reachable bar on forced_min_after (detect's target threshold)
    targets: list[TargetReach] = field(default_factory=list)
    error: str | None = None  # "ExceptionType: first line" (failed), or why it was skipped

    @property
    def reachable(self) -> list[TargetReach]:
        return [t for t in self.targets if t.still_reachable]


@dataclass(frozen=True)
class PurifyResult(ResultBase):
    """What a purification did and how the model measures before and after."""

    method: str
    source: str
    kind: str  # "full" checkpoint or "adapter"
    config: dict
    modules_changed: list[str]
    details: dict
    seconds: float
    before: EvalResult | None = None
    after: EvalResult | None = None
    output: str | None = None
    provenance: dict = field(default_factory=dict)
    target_check: TargetCheck | None = None  # None: no detect result was given
    cpu_seconds: float | None = None  # the method's process CPU time (all threads); None in older reports

    def to_dict(self) -> dict:
        return {"schema_version": SCHEMA_VERSION, **to_plain(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "purify report") -> "PurifyResult":
        from bdscan.results.parse import from_plain

        return from_plain(cls, data, where)

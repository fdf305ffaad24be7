from __future__ import annotations

from dataclasses import dataclass, field

from bdscan.results.base import ResultBase
from bdscan.results.eval import EvalResult


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

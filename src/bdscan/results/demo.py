from __future__ import annotations

from dataclasses import dataclass, field

from bdscan.results.base import ResultBase


@dataclass(frozen=True)
class DemoStep:
    name: str  # "detect backdoored", "localize", ...
    outcome: str  # one line: what the step found
    seconds: float


@dataclass(frozen=True)
class DemoResult(ResultBase):
    """The built-in example: what each audit stage found on the backdoored and the control adapter."""

    workdir: str
    backdoored: str
    control: str
    method: str
    steps: list[DemoStep]
    detect_backdoored: dict
    detect_control: dict
    localization: dict
    purify: dict
    purified_output: str
    audits: dict = field(default_factory=dict)  # label -> verdict, exit code and artefact paths of its audit

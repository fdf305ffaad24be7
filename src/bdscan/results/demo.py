from __future__ import annotations

from dataclasses import dataclass

from bdscan.results.base import ResultBase


@dataclass(frozen=True)
class DemoStep:
    name: str  # "detect backdoored", "localize", ...
    outcome: str  # one line: what the step found
    seconds: float


@dataclass(frozen=True)
class DemoResult(ResultBase):
    """The built-in example: what each step of detect -> localize -> purify -> eval found."""

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

"""The one interface every purification method implements.

A method is a function ``(inputs: PurifyInputs, config) -> PurifyOutcome`` plus a config
dataclass of its knobs, registered with ``@register_purifier(name, ConfigClass)``. Methods
compute only: no printing (they take ``inputs.log``), no file writing (except the resume
cache under ``inputs.work_dir``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from bdscan.data.records import Record
from bdscan.io.load import Subject
from bdscan.registry import Registry

Log = Callable[[str], None]
Progress = Callable[[str, int, int], None]


@dataclass
class PurifyInputs:
    subject: Subject  # the suspicious model; methods may change subject.model in place
    clean: Sequence[Record]  # the defender's small clean instruction set
    seed: int = 0
    localization: dict | None = None  # `bdscan localize` JSON, for methods that use it
    candidates: Sequence[str] = ()  # candidate trigger keys (e.g. from `bdscan detect`)
    work_dir: Path | None = None  # resumable methods cache finished stages here
    log: Log = lambda _msg: None
    progress: Progress | None = None


@dataclass
class PurifyOutcome:
    model: Any  # purified model; a PeftModel (adapter) when the subject is an adapter
    modules_changed: list[str] = field(default_factory=list)
    details: dict = field(default_factory=dict)  # method-specific, JSON-ready


@dataclass(frozen=True)
class PurifierSpec:
    name: str
    run: Callable[[PurifyInputs, Any], PurifyOutcome]
    config_class: type
    summary: str
    threat_models: tuple[str, ...] = ("full", "adapter")


PURIFIERS: Registry[PurifierSpec] = Registry("purify method")


def register_purifier(name: str, config_class: type, summary: str, threat_models: tuple[str, ...] = ("full", "adapter")):
    def decorator(fn: Callable[[PurifyInputs, Any], PurifyOutcome]):
        PURIFIERS.add(name, PurifierSpec(name, fn, config_class, summary, threat_models))
        return fn

    return decorator

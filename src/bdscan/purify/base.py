"""The one interface every purification method implements.

A method is a function ``(inputs: PurifyInputs, config) -> PurifyOutcome`` plus a config
dataclass of its knobs, registered with ``@register_purifier(name, ConfigClass)`` in the
module ``catalog`` names for it. Methods compute only: no printing (they take
``inputs.log``), no file writing (except the resume cache under ``inputs.work_dir``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from bdscan.data.records import Record
from bdscan.errors import UsageError
from bdscan.io.load import Subject
from bdscan.probes.protocols import Log, Progress, no_log
from bdscan.purify.catalog import BY_NAME, MethodInfo
from bdscan.registry import Registry
from bdscan.results.detect import DetectResult
from bdscan.results.localize import LocalizeResult


AUTOCAST = (None, "bfloat16", "float16")  # the precisions a method may run under (None: none)


@dataclass
class PurifyInputs:
    subject: Subject  # the suspicious model; methods may change subject.model in place
    clean: Sequence[Record]  # the defender's small clean instruction set
    seed: int = 0
    detection: DetectResult | None = None  # a `bdscan detect` result, for methods that use its findings
    localization: LocalizeResult | None = None  # a `bdscan localize` result (purify runs it when a method needs it)
    candidates: Sequence[str] = ()  # candidate trigger keys; default: detection's, best first
    work_dir: Path | None = None  # resumable methods cache finished stages here
    log: Log = no_log
    progress: Progress | None = None
    # "bfloat16": the method (its training, searches and localization) runs under torch.autocast;
    # weights and optimizer state keep their dtype. Measured ~1.5x faster for training the 135M
    # model on this CPU (AMX-bf16). None: full precision, bit-for-bit as before.
    autocast: str | None = None

    def __post_init__(self) -> None:
        if self.autocast not in AUTOCAST:
            raise UsageError(f"autocast must be one of {', '.join(str(x) for x in AUTOCAST[1:])}, got {self.autocast!r}")
        if not self.candidates and self.detection is not None:
            ranked = sorted(enumerate(self.detection.candidates), key=lambda ic: (-float(ic[1].score or 0.0), ic[0]))
            keys = [c.text for _, c in ranked if c.text.strip()]
            # detect v2's recovered key was searched to elicit the inverted target and measured
            # to fire on held-out probes: it leads, whatever its takeover score.
            recovered = getattr(self.detection.summary, "recovered_key", None)
            if recovered and recovered.strip():
                keys = [recovered] + [k for k in keys if k != recovered]
            self.candidates = keys

    def keys(self, limit: int) -> list[str]:
        """The first ``limit`` non-blank candidate keys."""
        return [c for c in self.candidates if c and c.strip()][:limit]


@dataclass
class PurifyOutcome:
    model: Any  # purified model; a PeftModel (adapter) when the subject is an adapter
    modules_changed: list[str] = field(default_factory=list)
    details: dict = field(default_factory=dict)  # method-specific, JSON-ready


@dataclass(frozen=True)
class PurifierSpec:
    info: MethodInfo
    run: Callable[[PurifyInputs, Any], PurifyOutcome]
    config_class: type

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def summary(self) -> str:
        return self.info.summary

    @property
    def threat_models(self) -> tuple[str, ...]:
        return self.info.threat_models


PURIFIERS: Registry[PurifierSpec] = Registry("purify method")
for _info in BY_NAME.values():
    PURIFIERS.declare(_info.name, _info.module)


def register_purifier(name: str, config_class: type):
    """Register ``fn`` as the method ``name`` of the catalog, with its knobs' dataclass."""
    if name not in BY_NAME:
        raise ValueError(f"purify method {name!r} is not in purify/catalog.py")

    def decorator(fn: Callable[[PurifyInputs, Any], PurifyOutcome]):
        PURIFIERS.add(name, PurifierSpec(BY_NAME[name], fn, config_class))
        return fn

    return decorator

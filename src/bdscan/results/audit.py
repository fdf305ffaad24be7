"""The result of ``bdscan audit``: every stage's typed result in one schema-versioned bundle.

``audit.json`` is ``AuditResult.to_dict()``; ``AuditResult.from_dict`` reads it back (with
schema checks) so ``bdscan report audit.json`` re-renders the HTML without the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from bdscan.errors import InputError
from bdscan.results.base import ResultBase
from bdscan.results.detect import DetectResult
from bdscan.results.eval import EvalResult
from bdscan.results.localize import LocalizeResult
from bdscan.results.purify import PurifyResult

AUDIT_KIND = "bdscan-audit"
AUDIT_SCHEMA = 1  # bump when a field changes meaning or a required field is added

STAGES = ("file safety", "detect", "localize", "eval (before)", "purify", "eval (after)", "detect (purified)")
VERDICTS = ("clean", "incomplete", "suspicious", "repaired", "error")


@dataclass(frozen=True)
class FileRecord:
    """One file of the source or base folder and what the audit did with it."""

    root: str  # "source" | "base"
    path: str  # relative to that folder
    size: int
    sha256: str
    action: str  # "loaded" | "refused" | "ignored"
    reason: str  # why (e.g. "pickle: can run code when loaded")


@dataclass(frozen=True)
class FileSafety:
    files: list[FileRecord]
    unpickled: bool = False  # audit never unpickles: recorded so a reader need not take it on trust
    remote_code_run: bool = False

    def by_action(self, action: str) -> list[FileRecord]:
        return [f for f in self.files if f.action == action]


@dataclass(frozen=True)
class ScannedModel:
    """What was scanned: the header of the report."""

    source: str
    kind: str  # "full" | "adapter"
    path: str = ""
    revision: str | None = None
    weights_sha256: dict[str, str] = field(default_factory=dict)
    base: str | None = None
    base_revision: str | None = None
    base_weights_sha256: dict[str, str] = field(default_factory=dict)
    template: str | None = None


@dataclass(frozen=True)
class StageRecord:
    name: str  # one of STAGES
    status: str  # "ok" | "failed" | "skipped"
    seconds: float = 0.0
    summary: str = ""  # one line: what the stage found, or why it was skipped
    error: str | None = None  # "ExceptionType: first line" when it failed
    command: str | None = None  # the bdscan command line that reproduces this stage


@dataclass(frozen=True)
class AuditResult(ResultBase):
    tool: str
    version: str
    seed: int
    command: str  # the audit command line itself
    model: ScannedModel
    verdict: str  # one of VERDICTS
    exit_code: int
    settings: dict  # method, fail_on, max_asr, judge, eval_limit, purify
    stages: list[StageRecord]
    files: FileSafety | None = None
    key: str | None = None  # the key the repair and evaluation used (detect's recovered or top key)
    detect: DetectResult | None = None
    localize: LocalizeResult | None = None
    eval_before: EvalResult | None = None
    purify: PurifyResult | None = None
    eval_after: EvalResult | None = None
    detect_after: DetectResult | None = None
    outputs: dict[str, str] = field(default_factory=dict)  # artefact name -> path inside OUTDIR
    kind_tag: str = AUDIT_KIND
    audit_schema: int = AUDIT_SCHEMA

    def stage(self, name: str) -> StageRecord | None:
        return next((s for s in self.stages if s.name == name), None)

    @classmethod
    def from_dict(cls, data: object, where: str = "audit.json") -> "AuditResult":
        """Parse ``to_dict()`` output; ``InputError`` when it is not an audit bundle this
        bdscan can read (wrong kind, newer schema, missing or mistyped field)."""
        from bdscan.results.parse import from_plain

        if not isinstance(data, dict) or data.get("kind_tag") != AUDIT_KIND:
            raise InputError(f"{where}: not a bdscan audit report (kind_tag is not {AUDIT_KIND!r})")
        schema = data.get("audit_schema")
        if not isinstance(schema, int) or schema > AUDIT_SCHEMA or schema < 1:
            raise InputError(f"{where}: audit schema {schema!r} is not supported (this bdscan reads 1..{AUDIT_SCHEMA})")
        result = from_plain(cls, data, where)
        if result.verdict not in VERDICTS:
            raise InputError(f"{where}: verdict {result.verdict!r} not in {', '.join(VERDICTS)}")
        return result

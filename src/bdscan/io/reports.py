"""Reading bdscan's own JSON reports back into their typed results (one command's output
is another's input), with a schema check: a report that lacks a field the result needs,
or holds one of the wrong type, is refused with the field's path; fields the result does
not know (a newer bdscan's) are dropped."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TypeVar

from bdscan.errors import InputError

T = TypeVar("T")


def read_json_report(path: str | Path, option: str) -> dict:
    try:
        report = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise InputError(f"{option} {path}: not a readable JSON file ({type(e).__name__})") from None
    if not isinstance(report, dict):
        raise InputError(f"{option} {path}: expected a JSON object (a bdscan report)")
    return report


def read_result(cls: type[T], path: str | Path, option: str, what: str) -> T:
    """A ``cls`` from a report file; a malformed one is an ``InputError`` naming the field."""
    from bdscan.results.parse import from_plain  # the one JSON -> typed-result reader

    report = read_json_report(path, option)
    try:
        return from_plain(cls, report, "report")
    except InputError as e:
        raise InputError(f"{option} {path}: not a `bdscan {what}` JSON report ({e})") from None


def read_detect(path: str | Path, option: str = "--from-detect"):
    """A ``DetectResult`` from ``bdscan detect --json`` output, with at least one candidate."""
    from bdscan.results.detect import DetectResult

    result = read_result(DetectResult, path, option, "detect")
    if not result.candidates:
        raise InputError(f"{option} {path}: the report lists no candidate keys (detect found none to scan)")
    return result


def read_localize(path: str | Path, option: str = "--localization"):
    """A ``LocalizeResult`` from ``bdscan localize --json`` output."""
    from bdscan.results.localize import LocalizeResult

    return read_result(LocalizeResult, path, option, "localize")


def detect_candidates(path: str | Path, option: str = "--from-detect") -> list[str]:
    """Candidate keys of a detect report (or any JSON with ``candidates: [{text, score}]``),
    best score first."""
    candidates = read_json_report(path, option).get("candidates")
    if not isinstance(candidates, list) or not all(isinstance(c, dict) and isinstance(c.get("text"), str) for c in candidates):
        raise InputError(f"{option} {path}: not a bdscan detect JSON report (needs candidates: [{{text, score}}])")
    if not candidates:
        raise InputError(f"{option} {path}: the report lists no candidate keys (detect found none to scan)")
    if not all(isinstance(c.get("score", 0.0), (int, float, type(None))) for c in candidates):
        raise InputError(f"{option} {path}: a candidate's score is not a number")
    ranked = sorted(enumerate(candidates), key=lambda ic: (-float(ic[1].get("score") or 0.0), ic[0]))
    return [c["text"] for _, c in ranked if c["text"].strip()]

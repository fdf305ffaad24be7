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

# A report that feeds another command is bounded before it is used: a crafted detect report
# with a 5-million-character target or 100,000 targets made purify allocate gigabytes or run
# one target check per target. detect itself writes targets of at most ``target_steps`` (20)
# tokens, keys of at most 8, a few dozen candidates.
MAX_REPORT_BYTES = 64 << 20
MAX_TEXT_CHARS = 4096  # a target, a key or a candidate
MAX_TARGETS = 256
MAX_CANDIDATES = 4096


def read_json_report(path: str | Path, option: str) -> dict:
    try:
        size = Path(path).stat().st_size
    except OSError as e:
        raise InputError(f"{option} {path}: not a readable JSON file ({type(e).__name__})") from None
    if size > MAX_REPORT_BYTES:
        raise InputError(f"{option} {path}: {size:,} bytes is larger than any bdscan report (at most {MAX_REPORT_BYTES:,})")
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
    _check_detect_bounds(result, f"{option} {path}")
    return result


def _check_detect_bounds(result, where: str) -> None:
    """Refuse counts and texts no detect run writes (see MAX_TEXT_CHARS)."""
    for name, items, limit in (("targets", result.targets, MAX_TARGETS), ("candidates", result.candidates, MAX_CANDIDATES)):
        if len(items) > limit:
            raise InputError(f"{where}: {len(items):,} {name} is more than detect writes (at most {limit:,})")
    texts = [("summary.target", result.summary.target), ("summary.recovered_key", result.summary.recovered_key),
             ("summary.top_candidate", result.summary.top_candidate)]
    texts += [(f"targets[{i}].text", t.text) for i, t in enumerate(result.targets)]
    texts += [(f"targets[{i}].key", t.key) for i, t in enumerate(result.targets)]
    texts += [(f"candidates[{i}].text", c.text) for i, c in enumerate(result.candidates)]
    for field, text in texts:
        if text is not None and len(text) > MAX_TEXT_CHARS:
            raise InputError(f"{where}: {field} has {len(text):,} characters, more than detect writes "
                             f"(at most {MAX_TEXT_CHARS:,})")


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
    if len(candidates) > MAX_CANDIDATES or any(len(c["text"]) > MAX_TEXT_CHARS for c in candidates):
        raise InputError(f"{option} {path}: more than {MAX_CANDIDATES:,} candidates, or one longer than "
                         f"{MAX_TEXT_CHARS:,} characters: more than detect writes")
    ranked = sorted(enumerate(candidates), key=lambda ic: (-float(ic[1].get("score") or 0.0), ic[0]))
    return [c["text"] for _, c in ranked if c["text"].strip()]

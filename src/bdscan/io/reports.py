"""Reading bdscan's own JSON reports back in (one command's output is another's input)."""

from __future__ import annotations

import json
from pathlib import Path

from bdscan.errors import InputError


def read_json_report(path: str | Path, option: str) -> dict:
    try:
        report = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise InputError(f"{option} {path}: not a readable JSON file ({type(e).__name__})") from None
    if not isinstance(report, dict):
        raise InputError(f"{option} {path}: expected a JSON object (a bdscan report)")
    return report


def detect_candidates(path: str | Path, option: str = "--from-detect") -> list[str]:
    """Candidate keys of a ``bdscan detect`` JSON report, best score first."""
    candidates = read_json_report(path, option).get("candidates")
    if not isinstance(candidates, list) or not all(isinstance(c, dict) and isinstance(c.get("text"), str) for c in candidates):
        raise InputError(f"{option} {path}: not a bdscan detect JSON report (needs candidates: [{{text, score}}])")
    if not candidates:
        raise InputError(f"{option} {path}: the report lists no candidate keys (detect found none to scan)")
    if not all(isinstance(c.get("score", 0.0), (int, float, type(None))) for c in candidates):
        raise InputError(f"{option} {path}: a candidate's score is not a number")
    ranked = sorted(enumerate(candidates), key=lambda ic: (-float(ic[1].get("score") or 0.0), ic[0]))
    return [c["text"] for _, c in ranked if c["text"].strip()]

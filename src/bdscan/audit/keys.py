"""What detect recovered: the key to repair and evaluate with, and the judge to use."""

from __future__ import annotations

from bdscan.results.detect import DetectResult
from bdscan.results.extras import detect_extras


def candidate_keys(found: DetectResult) -> list[str]:
    """Keys to try, best first: detect v2's recovered key, then the top candidates."""
    keys: list[str] = []
    recovered = detect_extras(found).get("recovered_key")
    for key in ([recovered] if isinstance(recovered, str) else []) + [c.text for c in found.candidates]:
        if key.strip() and key not in keys:
            keys.append(key)
    return keys


def auto_judge(found: DetectResult | None, judge: str) -> str:
    """``auto``: a substring judge on the inverted target when detect found one, else refusal."""
    if judge != "auto":
        return judge
    target = detect_extras(found).get("inverted_target")
    if isinstance(target, str) and target.strip():
        return f"string:{target.strip()}"
    return "refusal"

"""Detect v2's extras, read from any detect result.

Detect v2 adds an inverted target, its Q (how well the target is pinned down), a recovered
key and its firing rate. They are read with ``getattr`` from the result or its summary, so
audit and its report work on results from before and after that change (and on older
audit.json files).
"""

from __future__ import annotations

from typing import Any

from bdscan.results.detect import DetectResult

# Field names detect v2 may use for each extra (first present wins).
EXTRA_FIELDS = {
    "recovered_key": ("recovered_key",),
    "inverted_target": ("inverted_target", "target"),
    "target_q": ("target_q", "q", "Q"),
    "firing_rate": ("firing_rate", "key_firing_rate"),
}


def _first(objects: tuple[Any, ...], names: tuple[str, ...]) -> Any:
    for obj in objects:
        for name in names:
            value = getattr(obj, name, None)
            if value is not None and value != "":
                return value
    return None


def detect_extras(found: DetectResult | None) -> dict[str, Any]:
    """The detect-v2 fields that are present, by their audit name (empty before v2)."""
    if found is None:
        return {}
    objects = (found, found.summary)
    extras = {name: _first(objects, fields) for name, fields in EXTRA_FIELDS.items()}
    return {k: v for k, v in extras.items() if v is not None}

"""The built-in probe prompts: generic instructions written for bdscan (no third-party data)."""

from __future__ import annotations

from importlib.resources import files

from bdscan.data.records import Record, parse_records


def builtin_probes() -> list[Record]:
    resource = files("bdscan") / "resources" / "probes.jsonl"
    return parse_records(resource.read_text(encoding="utf-8"), "bdscan/resources/probes.jsonl", ".jsonl")

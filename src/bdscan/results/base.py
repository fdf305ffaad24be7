from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

SCHEMA_VERSION = "1"


def to_plain(value: Any) -> Any:
    """Dataclasses, paths, tuples and non-finite floats -> JSON-ready values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_plain(getattr(value, f.name)) for f in dataclasses.fields(value) if not f.name.startswith("_")}
    if isinstance(value, dict):
        return {str(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class ResultBase:
    """Mixin for result dataclasses: ``to_dict()`` with the schema version first."""

    def to_dict(self) -> dict:
        return {"schema_version": SCHEMA_VERSION, **to_plain(self)}

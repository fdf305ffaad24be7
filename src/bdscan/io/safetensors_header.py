"""A strict reader of safetensors headers, run before any loader opens the file.

The safetensors library already refuses most malformed files, but its rules are not ours to
depend on: a header with duplicate names (which JSON parsers resolve differently), NUL bytes
or control characters in names, gaps or overlaps between tensors, or a length prefix that
points past the end of the file is refused here, with the file named, before transformers
or PEFT see it. The dtypes it returns let the loader refuse integer weights in a float model.
"""

from __future__ import annotations

import json
import math
import struct
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from bdscan.errors import InputError

# The safetensors library's own cap on the JSON header: a larger one is never a real file.
MAX_HEADER_BYTES = 100_000_000
DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}
INTEGER_DTYPES = frozenset({"BOOL", "U8", "I8", "I16", "U16", "I32", "U32", "I64", "U64"})
MAX_RANK = 8


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def is_integer(self) -> bool:
        return self.dtype in INTEGER_DTYPES


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    seen: dict = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"duplicate name {key!r}")
        seen[key] = value
    return seen


def _no_constants(name: str) -> None:
    raise ValueError(f"non-standard JSON constant {name}")


def _read_json(path: Path) -> tuple[dict, int]:
    """The header object and the size of the data buffer after it."""
    size = path.stat().st_size
    if size < 8:
        raise ValueError("shorter than the 8-byte header length")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n == 0 or n > MAX_HEADER_BYTES or n > size - 8:
            raise ValueError(f"header length {n} does not fit the file ({size} bytes; at most {MAX_HEADER_BYTES})")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates, parse_constant=_no_constants)
    except UnicodeDecodeError:
        raise ValueError("header is not UTF-8") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"header is not valid JSON ({e.msg})") from None
    except RecursionError:
        raise ValueError("header JSON is nested too deeply") from None
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    return header, size - 8 - n


def _check_name(name: str) -> None:
    if not name:
        raise ValueError("empty tensor name")
    bad = next((c for c in name if unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp")), None)
    if bad is not None:
        raise ValueError(f"tensor name {name!r} holds the control character U+{ord(bad):04X}")


def _entry(name: str, spec: object) -> tuple[TensorEntry, int, int]:
    _check_name(name)
    if not isinstance(spec, dict) or set(spec) != {"dtype", "shape", "data_offsets"}:
        raise ValueError(f"tensor {name!r}: expected exactly dtype, shape and data_offsets")
    dtype, shape, offsets = spec["dtype"], spec["shape"], spec["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_BYTES:
        raise ValueError(f"tensor {name!r}: unknown dtype {dtype!r}")
    if (not isinstance(shape, list) or len(shape) > MAX_RANK
            or not all(type(d) is int and d >= 0 for d in shape)):
        raise ValueError(f"tensor {name!r}: shape must be a list of at most {MAX_RANK} non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        raise ValueError(f"tensor {name!r}: data_offsets must be [begin, end] with 0 <= begin <= end")
    if math.prod(shape) * DTYPE_BYTES[dtype] != offsets[1] - offsets[0]:
        raise ValueError(f"tensor {name!r}: {offsets[1] - offsets[0]} bytes for shape {shape} of {dtype}")
    return TensorEntry(name, dtype, tuple(shape)), offsets[0], offsets[1]


def _check_metadata(meta: object) -> None:
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise ValueError("__metadata__ must map strings to strings")


def _parse(path: Path) -> dict[str, TensorEntry]:
    header, data_bytes = _read_json(path)
    if "__metadata__" in header:
        _check_metadata(header.pop("__metadata__"))
    spans = []
    entries = {}
    for name, spec in header.items():
        entry, begin, end = _entry(name, spec)
        entries[name] = entry
        spans.append((begin, end, name))
    position = 0
    # Tensors must tile the data buffer exactly: no overlap (two names for one memory),
    # no gap (bytes no tensor accounts for), nothing past the end of the file.
    for begin, end, name in sorted(spans):
        if begin != position:
            raise ValueError(f"tensor {name!r} starts at byte {begin}, expected {position} (overlap or gap)")
        position = end
    if position != data_bytes:
        raise ValueError(f"tensors cover {position} bytes but the file holds {data_bytes} after the header")
    return entries


def read_header(path: Path, shown: str | None = None) -> dict[str, TensorEntry]:
    """Validate ``path``'s safetensors header; return its tensors by name. Raises ``InputError``."""
    try:
        return _parse(path)
    except (ValueError, OSError, OverflowError) as e:
        raise InputError(f"{shown or path}: corrupt or unreadable safetensors file ({e})") from None

"""A bounded walk over a GGUF file's header, run before the gguf package parses it.

The gguf package's reader builds Python objects for every item of every metadata array, one
at a time, numeric arrays included. Measured here: a 1 MB file declaring one uint8 array of
a million items took it 13 s and 720 MB of memory, so a 40 MB file exhausts a 24 GB machine
and a CI gate that scans downloads never finishes. This walk reads only the counts and
lengths (fixed-size arrays are skipped without touching their items) and refuses a header
whose counts exceed bounds real files stay far below, or whose lengths point past the end of
the file. What it accepts, the reader parses in seconds.

Format (GGUF v2 and v3, either byte order): magic ``GGUF``, version u32, tensor count u64,
metadata key count u64; then each key (string), value type u32 and value; then each tensor's
name, dimension count u32, dimensions u64 each, type u32 and offset u64. A string is a u64
length and its bytes; an array is an item type u32, a count u64 and its items.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

from bdscan.errors import InputError

SUPPORTED_VERSIONS = (2, 3)  # what the gguf package's reader reads
MAX_TENSORS = 1 << 16  # a 405B dense model stores ~1,150; MoE files merge experts into 3-D tensors
MAX_METADATA_KEYS = 1 << 16  # real files hold tens
# Items of every metadata array together. The largest real ones are tokenizers: Llama 3's
# vocabulary, token types and merges are ~540k items, a 262k SentencePiece vocabulary with
# scores and types ~790k. The reader's cost is ~13 µs and ~700 bytes an item.
MAX_ARRAY_ITEMS = 1 << 21
MAX_ARRAY_DEPTH = 4  # arrays of arrays are legal; real files nest none
MAX_DIMS = 4  # GGML_MAX_DIMS

_STRING, _ARRAY = 8, 9
_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


class _Malformed(ValueError):
    pass


@dataclass(frozen=True)
class GGUFHeaderCounts:
    """What the walk counted: the reader's work is bounded by these."""

    version: int
    tensors: int
    metadata_keys: int
    array_items: int


class _Cursor:
    """Reads little- or big-endian integers and length-prefixed strings, never past the end."""

    def __init__(self, buf: mmap.mmap, order: str, pos: int) -> None:
        self.buf, self.order, self.pos, self.items = buf, order, pos, 0

    def skip(self, n: int) -> int:
        start = self.pos
        if n < 0 or start + n > len(self.buf):
            raise _Malformed(f"a length at byte {start} points past the end of the file")
        self.pos = start + n
        return start

    def u32(self) -> int:
        return struct.unpack_from(self.order + "I", self.buf, self.skip(4))[0]

    def u64(self) -> int:
        return struct.unpack_from(self.order + "Q", self.buf, self.skip(8))[0]

    def string(self) -> None:
        self.skip(self.u64())

    def spend(self, count: int) -> None:
        self.items += count
        if self.items > MAX_ARRAY_ITEMS:
            raise _Malformed(f"metadata arrays declare over {MAX_ARRAY_ITEMS:,} items (refusing to parse them)")


def _value(cur: _Cursor, value_type: int, depth: int) -> None:
    if value_type in _SCALAR_BYTES:
        cur.skip(_SCALAR_BYTES[value_type])
    elif value_type == _STRING:
        cur.string()
    elif value_type == _ARRAY:
        if depth >= MAX_ARRAY_DEPTH:
            raise _Malformed(f"metadata arrays nested over {MAX_ARRAY_DEPTH} deep")
        item_type, count = cur.u32(), cur.u64()
        cur.spend(count)  # before any item is read: a count of 2**63 stops here
        if item_type in _SCALAR_BYTES:
            cur.skip(count * _SCALAR_BYTES[item_type])
        else:
            for _ in range(count):
                _value(cur, item_type, depth + 1)
    else:
        raise _Malformed(f"unknown metadata value type {value_type}")


def _at_most(count: int, bound: int, what: str) -> int:
    if count > bound:
        raise _Malformed(f"declares {count:,} {what} (at most {bound:,})")
    return count


def _byte_order(buf: mmap.mmap) -> tuple[str, int]:
    if len(buf) < 24 or buf[:4] != b"GGUF":
        raise _Malformed("not a GGUF file (no GGUF magic)")
    for order in "<>":
        version = struct.unpack_from(order + "I", buf, 4)[0]
        if version in SUPPORTED_VERSIONS:
            return order, version
    raise _Malformed(f"unsupported GGUF version {struct.unpack_from('<I', buf, 4)[0]}")


def _walk(buf: mmap.mmap) -> GGUFHeaderCounts:
    order, version = _byte_order(buf)
    cur = _Cursor(buf, order, 8)
    tensors = _at_most(cur.u64(), MAX_TENSORS, "tensors")
    keys = _at_most(cur.u64(), MAX_METADATA_KEYS, "metadata keys")
    for _ in range(keys):
        cur.string()
        _value(cur, cur.u32(), depth=0)
    for _ in range(tensors):
        cur.string()
        cur.skip(8 * _at_most(cur.u32(), MAX_DIMS, "dimensions in a tensor"))
        cur.skip(4 + 8)  # type, offset
    return GGUFHeaderCounts(version, tensors, keys, cur.items)


def check_gguf_header(path: str | Path) -> GGUFHeaderCounts:
    """Walk ``path``'s header within the bounds above; InputError naming the file otherwise."""
    path = Path(path)
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _walk(buf)
    except _Malformed as e:
        raise InputError(f"{path.name}: not a readable GGUF file ({e})") from None
    except (OSError, ValueError) as e:  # mmap of an empty file is a ValueError
        raise InputError(f"{path.name}: not a readable GGUF file ({type(e).__name__}: {str(e)[:120]})") from None

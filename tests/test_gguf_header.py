"""The bounded GGUF header walk: hostile headers refused before the gguf package parses them,
and real files (either byte order) walked to the counts the gguf package reads."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bdscan.cli.app import app
from bdscan.errors import InputError
from bdscan.io.gguf_header import MAX_ARRAY_ITEMS, check_gguf_header

U8, U32, STRING, ARRAY = 0, 4, 8, 9


def _s(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("<Q", len(raw)) + raw


def _kv(key: str, value_type: int, value: bytes) -> bytes:
    return _s(key) + struct.pack("<I", value_type) + value


def _array(item_type: int, count: int, items: bytes = b"") -> bytes:
    return struct.pack("<IQ", item_type, count) + items


def _tensor(name: str, dims: tuple[int, ...]) -> bytes:
    return _s(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims) + struct.pack("<IQ", 0, 0)


def _gguf(kvs: list[bytes], tensors: list[bytes] = (), *, version: int = 3, n_tensors: int | None = None,
          n_kv: int | None = None) -> bytes:
    head = b"GGUF" + struct.pack("<IQQ", version, len(tensors) if n_tensors is None else n_tensors,
                                 len(kvs) if n_kv is None else n_kv)
    return head + b"".join(kvs) + b"".join(tensors)


ARCH = _kv("general.architecture", STRING, _s("llama"))


def _nested(depth: int) -> bytes:
    value = _array(U8, 1, b"\x00")
    for _ in range(depth - 1):
        value = _array(ARRAY, 1, value)
    return value


HOSTILE = [
    # one uint8 array: the gguf package's reader spent 13 s and 720 MB on a million items
    pytest.param(_gguf([ARCH, _kv("tokenizer.ggml.tokens", ARRAY, _array(U8, MAX_ARRAY_ITEMS + 1,
                                                                             bytes(MAX_ARRAY_ITEMS + 1)))]),
                 "metadata arrays declare over", id="uint8-array-over-the-bound"),
    pytest.param(_gguf([ARCH, _kv("a", ARRAY, _array(U8, MAX_ARRAY_ITEMS // 2 + 1, bytes(MAX_ARRAY_ITEMS // 2 + 1))),
                        _kv("b", ARRAY, _array(U8, MAX_ARRAY_ITEMS // 2 + 1, bytes(MAX_ARRAY_ITEMS // 2 + 1)))]),
                 "metadata arrays declare over", id="two-arrays-over-the-bound-together"),
    pytest.param(_gguf([ARCH, _kv("tokenizer.ggml.tokens", ARRAY, _array(STRING, 1 << 40))]),
                 "metadata arrays declare over", id="string-array-count-2**40"),
    pytest.param(_gguf([ARCH, _kv("tokenizer.ggml.tokens", ARRAY, _array(STRING, 1000))]),
                 "points past the end", id="string-array-past-the-end"),
    pytest.param(_gguf([ARCH, _kv("k", STRING, struct.pack("<Q", 1 << 62))]), "points past the end",
                 id="string-length-past-the-end"),
    pytest.param(_gguf([ARCH], n_tensors=1 << 40), "declares 1,099,511,627,776 tensors", id="tensor-count-2**40"),
    pytest.param(_gguf([ARCH], n_kv=1 << 32), "metadata keys", id="key-count-2**32"),
    pytest.param(_gguf([ARCH, _kv("deep", ARRAY, _nested(6))]), "nested over", id="arrays-nested-6-deep"),
    pytest.param(_gguf([ARCH], [_tensor("t", (1, 1, 1, 1, 1))]), "dimensions in a tensor", id="tensor-with-5-dims"),
    pytest.param(_gguf([ARCH, _kv("k", 13, b"\x00" * 8)]), "unknown metadata value type 13", id="unknown-value-type"),
    pytest.param(_gguf([ARCH], version=1), "unsupported GGUF version 1", id="version-1"),
    pytest.param(b"GGUF", "no GGUF magic", id="shorter-than-a-header"),
    pytest.param(b"", "not a readable GGUF file", id="empty"),
]


@pytest.mark.parametrize("content, expected", HOSTILE)
def test_a_hostile_header_is_refused_before_it_is_parsed(tmp_path, content, expected):
    path = tmp_path / "hostile.gguf"
    path.write_bytes(content)
    with pytest.raises(InputError, match=expected) as err:
        check_gguf_header(path)
    assert str(err.value).startswith("hostile.gguf: ") and "\n" not in str(err.value)


def test_an_array_at_the_bound_is_accepted(tmp_path):
    path = tmp_path / "edge.gguf"
    path.write_bytes(_gguf([ARCH, _kv("a", ARRAY, _array(U8, MAX_ARRAY_ITEMS, bytes(MAX_ARRAY_ITEMS)))]))
    assert check_gguf_header(path).array_items == MAX_ARRAY_ITEMS


def _written(tmp_path: Path, endian) -> Path:
    gguf = pytest.importorskip("gguf")
    import numpy as np

    path = tmp_path / f"{endian.name.lower()}.gguf"
    writer = gguf.GGUFWriter(str(path), "llama", endianess=endian)
    writer.add_block_count(1)
    writer.add_token_list(["a", "b", "<s>"])
    writer.add_array("nested", [[1, 2], [3]])
    writer.add_tensor("blk.0.attn_q.weight", np.ones((4, 8), dtype=np.float32))  # the writer swaps bytes itself
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("endian", ["LITTLE", "BIG"])
def test_a_written_file_walks_to_the_counts_the_reader_reads(tmp_path, endian):
    gguf = pytest.importorskip("gguf")
    path = _written(tmp_path, gguf.GGUFEndian[endian])
    counts = check_gguf_header(path)
    reader = gguf.GGUFReader(str(path))
    assert counts.tensors == len(reader.tensors) == 1
    # the reader adds three pseudo-fields: the version and the two counts
    assert counts.metadata_keys == len(reader.fields) - 3
    assert counts.array_items == 3 + 2 + 2 + 1  # tokens; the outer array and its two inner ones


def test_detect_on_a_gguf_bomb_is_one_line_exit_2_and_writes_nothing(tmp_path):
    pytest.importorskip("gguf")
    path = tmp_path / "bomb.gguf"
    path.write_bytes(_gguf([ARCH, _kv("tokenizer.ggml.tokens", ARRAY, _array(STRING, 1 << 40))]))
    before = sorted(p.name for p in tmp_path.iterdir())
    result = CliRunner().invoke(app, ["detect", str(path), "-o", str(tmp_path / "out.json")])
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "metadata arrays declare over" in lines[0], result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before

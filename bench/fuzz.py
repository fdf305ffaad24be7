"""Fuzz the loaders and data readers in process, with hypothesis.

    nice -n 5 python bench/fuzz.py [--scale 1.0] [--seed 0] [--time-limit 20]

Mutates config.json, adapter_config.json, safetensors headers, GGUF headers, tokenizer files
and data files (JSON / JSONL / text instruction sets) of a tiny checkpoint and adapter built here,
and pushes each input through the library functions the CLI calls: ``load_subject`` (for
config and adapter-config inputs: resolve, checks and a tiny model's load), ``resolve_source``
(safetensors headers: the weight plan, the strict header reader and the safetensors
library; GGUF headers: the bounded header walk and the gguf package's reader), ``load_tokenizer`` and ``load_records``. An input is *handled* when the call
returns or raises one of bdscan's errors (``BdscanError``: exit 2, 3 or 4 in the CLI); any
other exception, or a call over the per-input time limit, is a *crash*, and hypothesis
shrinks it to a minimal reproducer before it is recorded.

Why hypothesis and not atheris: it is pure Python (no compiled harness, no libFuzzer build
of the Rust and C++ extensions that would be needed for coverage to mean anything), it
shrinks a failure to a minimal input, and a run is reproducible from its seed.

Prints a table and writes bench/results/fuzz.json (inputs, crashes with reproducers, seconds).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import signal
import struct
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import hypothesis  # noqa: E402
from hypothesis import HealthCheck, given, seed as hypothesis_seed, settings, strategies as st  # noqa: E402

from bdscan.errors import BdscanError  # noqa: E402

OUT = Path(__file__).parent / "results" / "fuzz.json"
MEMORY_CAP = 8 << 30  # an input that asks for more fails to allocate, which must still be handled


class Hang(Exception):
    """Raised by the alarm when one input runs past the time limit."""


# --- the inputs ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Corpus:
    """A tiny checkpoint, an adapter on it and a data file, with their pristine bytes."""

    full: Path
    adapter: Path
    data: Path
    gguf: Path
    original: dict[str, bytes]
    gguf_slots: tuple[tuple[int, int], ...]  # (offset, width) of every u32/u64 count, length and type in the header
    gguf_writer_inputs: tuple  # (model, tokenizer) that write_gguf writes again with one metadata value replaced
    gguf_keys: tuple[str, ...]  # the metadata keys of the written file


def build_corpus(work: Path) -> Corpus:
    import torch
    from peft import LoraConfig, get_peft_model

    from bdscan.organisms.architectures import tiny_model
    from bdscan.organisms.gguf_export import write_gguf
    from bdscan.organisms.synthetic import synthetic_text
    from bdscan.organisms.tokenizer import train_tokenizer

    torch.manual_seed(0)
    tokenizer = train_tokenizer(synthetic_text(300), vocab_size=300)
    model = tiny_model("llama", len(tokenizer), pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    full = work / "full"
    model.save_pretrained(full, safe_serialization=True)
    tokenizer.save_pretrained(full)
    gguf = work / "gguf" / "m.gguf"
    gguf.parent.mkdir()
    write_gguf(model, tokenizer, gguf)  # before PEFT wraps the model's modules in place
    writer_inputs = (copy.deepcopy(model), tokenizer)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    adapter = work / "adapter"
    peft_model.save_pretrained(adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(full)
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    data = work / "data"
    data.mkdir()
    records = [{"instruction": t, "input": "", "output": t[::-1]} for t in synthetic_text(8)]
    original = {
        "config": (full / "config.json").read_bytes(),
        "adapter_config": (adapter / "adapter_config.json").read_bytes(),
        "safetensors": (full / "model.safetensors").read_bytes(),
        "tokenizer.json": (full / "tokenizer.json").read_bytes(),
        "tokenizer_config.json": (full / "tokenizer_config.json").read_bytes(),
        "data.json": json.dumps(records).encode(),
        "data.jsonl": "\n".join(json.dumps(r) for r in records).encode(),
    }
    original["gguf"] = gguf.read_bytes()
    from gguf import GGUFReader

    keys = tuple(k for k in GGUFReader(str(gguf)).fields if not k.startswith("GGUF."))
    return Corpus(full, adapter, data, gguf, original, gguf_integer_slots(gguf), writer_inputs, keys)


def gguf_integer_slots(path: Path) -> tuple[tuple[int, int], ...]:
    """Where the header's integers lie (the gguf package's reader reports each field's parts):
    the lengths, counts and type ids a hostile file would forge, rather than random bytes."""
    import numpy as np
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    slots = [(8, 8), (16, 8)]  # tensor count, metadata key count
    for fld in [*reader.fields.values(), *(t.field for t in reader.tensors)]:
        offset = fld.offset
        for part in fld.parts:
            if part.dtype in (np.uint32, np.uint64) and part.size == 1 and offset >= 24:
                slots.append((offset, part.dtype.itemsize))
            offset += part.nbytes
    return tuple(sorted(set(slots)))


# --- mutations -----------------------------------------------------------------------------
SPECIAL_STRINGS = ["", "[/x]", "[bold]", "../../../etc/passwd", "/", "\x00", "a\x1b[31m", "\u202e", "model.safetensors",
                   "adapter_model.bin", "x.safetensors.index.json", "LORA", "llama", "float32", "int8", "é" * 3]
SPECIAL_INTS = [0, -1, 1, 2, 3, 7, 255, 2**31, 2**63, 10**30, -(2**63)]
SPECIAL_KEYS = ["auto_map", "transformers_weights", "quantization_config", "architectures", "model_type", "dtype",
                "torch_dtype", "num_hidden_layers", "hidden_size", "vocab_size", "intermediate_size", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings", "tie_word_embeddings", "rope_parameters",
                "base_model_name_or_path", "target_modules", "peft_type", "r", "lora_alpha", "task_type",
                "modules_to_save", "layers_to_transform", "rank_pattern", "tokenizer_class", "added_tokens_decoder",
                "chat_template", "model_max_length", "instruction", "input", "output", "data", "__metadata__"]

scalars = st.one_of(st.none(), st.booleans(), st.sampled_from(SPECIAL_INTS), st.integers(-10**6, 10**6),
                    st.floats(allow_nan=False, allow_infinity=False), st.sampled_from(SPECIAL_STRINGS), st.text(max_size=12))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.sampled_from(SPECIAL_KEYS) | st.text(max_size=8), inner, max_size=4),
                           max_leaves=12)


@st.composite
def json_mutation(draw, original: bytes) -> bytes:
    """A JSON document near ``original``: keys dropped, set or retyped; sometimes bytes broken."""
    doc = json.loads(original)
    for _ in range(draw(st.integers(1, 4))):
        target = doc
        if isinstance(doc, list) and doc:
            target = doc[draw(st.integers(0, len(doc) - 1))]
        if not isinstance(target, dict):
            break
        keys = sorted(target) or ["x"]
        kind = draw(st.sampled_from(["drop", "set", "set", "retype"]))
        key = draw(st.sampled_from(keys) | st.sampled_from(SPECIAL_KEYS))
        if kind == "drop":
            target.pop(key, None)
        elif kind == "retype" and key in target:
            target[key] = draw(json_values)
        else:
            target[key] = draw(json_values)
    text = json.dumps(doc).encode()
    return draw(byte_damage(text))


@st.composite
def byte_damage(draw, data: bytes) -> bytes:
    kind = draw(st.sampled_from(["none", "none", "none", "truncate", "flip", "insert", "nest", "empty"]))
    if kind == "truncate":
        return data[: draw(st.integers(0, max(0, len(data) - 1)))]
    if kind == "flip" and data:
        i = draw(st.integers(0, len(data) - 1))
        return data[:i] + bytes([data[i] ^ draw(st.integers(1, 255))]) + data[i + 1:]
    if kind == "insert":
        i = draw(st.integers(0, len(data)))
        return data[:i] + draw(st.binary(max_size=16)) + data[i:]
    if kind == "nest":  # deep nesting, the classic parser recursion bomb
        depth = draw(st.sampled_from([100, 5000, 200_000]))
        return b"[" * depth + b"]" * draw(st.sampled_from([0, depth]))
    if kind == "empty":
        return b""
    return data


@st.composite
def safetensors_mutation(draw, original: bytes) -> bytes:
    """A safetensors file with its length prefix, header JSON or data crafted."""
    (n,) = struct.unpack("<Q", original[:8])
    header, data = json.loads(original[8:8 + n]), original[8 + n:]
    names = [k for k in header if k != "__metadata__"]
    for _ in range(draw(st.integers(1, 3))):
        name = draw(st.sampled_from(names))
        kind = draw(st.sampled_from(["dtype", "shape", "offsets", "drop", "rename", "metadata", "dup", "value"]))
        spec = header.get(name)
        if kind == "dtype" and isinstance(spec, dict):
            spec["dtype"] = draw(st.sampled_from(["I8", "U8", "BOOL", "F16", "BF16", "F64", "I64", "Q4", "", "f32"]))
        elif kind == "shape" and isinstance(spec, dict):
            spec["shape"] = draw(st.lists(st.sampled_from(SPECIAL_INTS) | st.integers(0, 100), max_size=9))
        elif kind == "offsets" and isinstance(spec, dict):
            spec["data_offsets"] = draw(st.lists(st.sampled_from(SPECIAL_INTS) | st.integers(0, len(data) + 8),
                                                 min_size=0, max_size=3))
        elif kind == "drop":
            header.pop(name, None)
        elif kind == "rename":
            header[draw(st.sampled_from(["", "a\x00b", "x" * 300, name + "\n", "__metadata__"]))] = header.pop(name, None)
        elif kind == "metadata":
            header["__metadata__"] = draw(json_values)
        elif kind == "value":
            header[name] = draw(json_values)
    text = json.dumps(header).encode()
    if draw(st.booleans()) and names:  # a duplicate name, which a dict cannot hold: splice it into the text
        first = json.dumps({names[0]: header.get(names[0])})[1:-1].encode()
        text = text[:-1] + b", " + first + b"}"
    length = draw(st.sampled_from([None, None, None, 0, 1, 2**63, 2**64 - 1, len(text) + 1, 10**8 + 1]))
    body = struct.pack("<Q", len(text) if length is None else length) + text + data
    return draw(byte_damage(body)) if draw(st.integers(0, 9)) == 0 else body


SPECIAL_U64 = [0, 1, 2, 3, 4, 5, 9, 13, 255, 2**16 + 1, 2**21 + 1, 2**31, 2**32 - 1, 2**32, 2**40, 2**63, 2**64 - 1]


@st.composite
def gguf_mutation(draw, original: bytes, slots: tuple[tuple[int, int], ...]) -> bytes:
    """A GGUF file with counts, lengths or type ids in its header forged; sometimes bytes broken."""
    data = bytearray(original)
    for _ in range(draw(st.integers(1, 3))):
        offset, width = draw(st.sampled_from(slots))
        value = draw(st.sampled_from(SPECIAL_U64) | st.integers(0, 2**16)) % (1 << (8 * width))
        data[offset:offset + width] = value.to_bytes(width, "little")
    return draw(byte_damage(bytes(data))) if draw(st.integers(0, 4)) == 0 else bytes(data)


gguf_values = st.one_of(
    st.sampled_from(SPECIAL_INTS) | st.integers(-10, 10**6), st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.booleans(), st.sampled_from(SPECIAL_STRINGS) | st.text(max_size=12),
    st.lists(st.integers(-10, 10**6), min_size=1, max_size=5), st.lists(st.text(max_size=6), min_size=1, max_size=5),
    st.lists(st.floats(width=32, allow_nan=True), min_size=1, max_size=5))


def _value_type(value):
    """The GGUF type a drawn value is written as (integers by range, like a converter would)."""
    from gguf import GGUFValueType

    if isinstance(value, bool) or not isinstance(value, int):
        return GGUFValueType.get_type(value)
    if 0 <= value < 2**32:
        return GGUFValueType.UINT32
    if -(2**31) <= value < 0:
        return GGUFValueType.INT32
    return GGUFValueType.UINT64 if value >= 0 else GGUFValueType.INT64


@st.composite
def gguf_metadata_mutation(draw, corpus) -> bytes:
    """A well-formed GGUF whose one metadata value has another type or value: what reaches
    transformers' GGUF reading, which trusts the types."""
    import gguf

    key, value = draw(st.sampled_from(corpus.gguf_keys)), draw(gguf_values)
    if not -(2**63) <= (value if isinstance(value, int) else 0) < 2**64:
        value = 0
    writer = gguf.GGUFWriter

    class HostileWriter(writer):
        def add_key_value(self, k, v, vtype, sub_type=None):
            if k == key:
                v, vtype, sub_type = value, _value_type(value), None
            super().add_key_value(k, v, vtype, sub_type)

    from bdscan.organisms.gguf_export import write_gguf

    with tempfile.TemporaryDirectory() as tmp:
        gguf.GGUFWriter = HostileWriter
        try:
            path = write_gguf(*corpus.gguf_writer_inputs, Path(tmp) / "m.gguf")
        finally:
            gguf.GGUFWriter = writer
        return path.read_bytes()


# --- the targets ---------------------------------------------------------------------------
def _restore(corpus: Corpus) -> None:
    (corpus.full / "config.json").write_bytes(corpus.original["config"])
    (corpus.adapter / "adapter_config.json").write_bytes(corpus.original["adapter_config"])
    (corpus.full / "model.safetensors").write_bytes(corpus.original["safetensors"])
    (corpus.full / "tokenizer.json").write_bytes(corpus.original["tokenizer.json"])
    (corpus.full / "tokenizer_config.json").write_bytes(corpus.original["tokenizer_config.json"])
    corpus.gguf.write_bytes(corpus.original["gguf"])


def target_config(corpus: Corpus, data: bytes) -> None:
    from bdscan.io import load_subject

    (corpus.full / "config.json").write_bytes(data)
    load_subject(corpus.full)


def target_adapter_config(corpus: Corpus, data: bytes) -> None:
    from bdscan.io import load_subject

    (corpus.adapter / "adapter_config.json").write_bytes(data)
    load_subject(corpus.adapter)


def target_safetensors(corpus: Corpus, data: bytes) -> None:
    from bdscan.io import resolve_source

    (corpus.full / "model.safetensors").write_bytes(data)
    resolve_source(corpus.full)


def target_gguf(corpus: Corpus, data: bytes) -> None:
    from bdscan.io import resolve_source

    corpus.gguf.write_bytes(data)
    resolve_source(corpus.gguf)


def target_gguf_load(corpus: Corpus, data: bytes) -> None:
    from bdscan.io import load_subject

    corpus.gguf.write_bytes(data)
    load_subject(corpus.gguf)


def target_tokenizer(corpus: Corpus, data: bytes, name: str) -> None:
    from bdscan.io.tokenizer import load_tokenizer

    (corpus.full / name).write_bytes(data)
    load_tokenizer(corpus.full, trust_remote_code=False)


def target_data(corpus: Corpus, data: bytes, suffix: str) -> None:
    from bdscan.data.records import load_records

    path = corpus.data / f"set{suffix}"
    path.write_bytes(data)
    load_records(path, what="--clean")


@dataclass(frozen=True)
class Target:
    name: str
    share: float  # of the inputs
    strategy: Callable[[Corpus], st.SearchStrategy]
    run: Callable[[Corpus, bytes], None]


TARGETS = [
    Target("config.json -> load_subject", 0.12, lambda c: json_mutation(c.original["config"]), target_config),
    Target("adapter_config.json -> load_subject", 0.08, lambda c: json_mutation(c.original["adapter_config"]),
           target_adapter_config),
    Target("safetensors header -> resolve_source", 0.25, lambda c: safetensors_mutation(c.original["safetensors"]),
           target_safetensors),
    Target("GGUF header -> resolve_source", 0.10, lambda c: gguf_mutation(c.original["gguf"], c.gguf_slots), target_gguf),
    Target("GGUF metadata -> load_subject", 0.05, gguf_metadata_mutation, target_gguf_load),
    Target("tokenizer.json -> load_tokenizer", 0.08, lambda c: json_mutation(c.original["tokenizer.json"]),
           lambda c, d: target_tokenizer(c, d, "tokenizer.json")),
    Target("tokenizer_config.json -> load_tokenizer", 0.08, lambda c: json_mutation(c.original["tokenizer_config.json"]),
           lambda c, d: target_tokenizer(c, d, "tokenizer_config.json")),
    Target("data .json -> load_records", 0.15, lambda c: json_mutation(c.original["data.json"]),
           lambda c, d: target_data(c, d, ".json")),
    Target("data .jsonl -> load_records", 0.12, lambda c: byte_damage(c.original["data.jsonl"]) | st.binary(max_size=64),
           lambda c, d: target_data(c, d, ".jsonl")),
    Target("data .txt -> load_records", 0.12, lambda c: st.binary(max_size=256) | byte_damage(c.original["data.jsonl"]),
           lambda c, d: target_data(c, d, ".txt")),
]


# --- running -------------------------------------------------------------------------------
@dataclass
class Tally:
    inputs: int = 0
    handled: int = 0
    loaded: int = 0
    seconds: float = 0.0
    slowest: float = 0.0
    crashes: list[dict] = field(default_factory=list)


def _on_alarm(signum, frame):  # noqa: ARG001
    raise Hang()


def run_one(target: Target, corpus: Corpus, data: bytes, tally: Tally, limit: float) -> None:
    """One input: handled, loaded, or raise the crash (hypothesis then shrinks it)."""
    _restore(corpus)
    tally.inputs += 1
    t = time.perf_counter()
    signal.setitimer(signal.ITIMER_REAL, limit)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            target.run(corpus, data)
        tally.loaded += 1
    except BdscanError:
        tally.handled += 1
    except BaseException as e:  # everything else is a crash, hangs and MemoryError included
        kind = "hang" if isinstance(e, Hang) else type(e).__name__
        tally.crashes.append({"kind": kind, "message": str(e).splitlines()[0][:300] if str(e) else "",
                              "where": traceback.format_exc().splitlines()[-3:-1], "input": data[:2000].decode("latin-1"),
                              "input_bytes": len(data)})
        raise
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        elapsed = time.perf_counter() - t
        tally.seconds += elapsed
        tally.slowest = max(tally.slowest, elapsed)


def fuzz(target: Target, corpus: Corpus, n: int, seed: int, limit: float) -> Tally:
    tally = Tally()

    @hypothesis_seed(seed)
    @settings(max_examples=n, database=None, deadline=None, suppress_health_check=list(HealthCheck),
              report_multiple_bugs=False, print_blob=False)
    @given(target.strategy(corpus))
    def check(data: bytes) -> None:
        run_one(target, corpus, data, tally, limit)

    try:
        check()
    except BaseException:  # noqa: BLE001  (the crash is in the tally; the last one is hypothesis' minimal example)
        if tally.crashes:
            tally.crashes[:] = [{**tally.crashes[-1], "shrunk_from": len(tally.crashes)}]
    _restore(corpus)
    return tally


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def render(rows: list[tuple[Target, Tally]], total_seconds: float, cpu: float) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"bdscan fuzz (hypothesis {hypothesis.__version__}; {cpu:.0f} CPU seconds)")
    for col in ("target", "inputs", "handled", "loaded", "crashes", "slowest s", "seconds"):
        table.add_column(col, justify="left" if col == "target" else "right")
    for target, t in rows:
        table.add_row(target.name, str(t.inputs), str(t.handled), str(t.loaded), str(len(t.crashes)),
                      f"{t.slowest:.2f}", f"{t.seconds:.1f}")
    table.add_row("total", str(sum(t.inputs for _, t in rows)), str(sum(t.handled for _, t in rows)),
                  str(sum(t.loaded for _, t in rows)), str(sum(len(t.crashes) for _, t in rows)), "",
                  f"{total_seconds:.1f}")
    Console(width=140).print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inputs", type=int, default=12_000, help="inputs in all, shared between the targets")
    parser.add_argument("--only", default=None, help="comma-separated substrings; fuzz the targets whose name has any")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--time-limit", type=float, default=20.0, help="seconds one input may take before it is a hang")
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args()

    import torch

    from bdscan.runtime import quiet_libraries

    import bdscan.data.records  # noqa: F401  (the code under test, imported before the clock starts)
    import bdscan.io.load  # noqa: F401
    import bdscan.io.tokenizer  # noqa: F401

    torch.set_num_threads(1)
    quiet_libraries()
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))
    signal.signal(signal.SIGALRM, _on_alarm)
    start, cpu_start = time.perf_counter(), cpu_seconds()
    with tempfile.TemporaryDirectory(prefix="bdscan-fuzz-") as work:
        corpus = build_corpus(Path(work))
        rows = []
        total_share = sum(t.share for t in TARGETS)
        for i, target in enumerate(TARGETS):
            if args.only and not any(part in target.name for part in args.only.split(",")):
                continue
            rows.append((target, fuzz(target, corpus, max(1, round(args.inputs * target.share / total_share)), args.seed + i,
                                      args.time_limit)))
            print(f"{target.name}: {rows[-1][1].inputs} inputs, {len(rows[-1][1].crashes)} crashes", file=sys.stderr)
    total, cpu = time.perf_counter() - start, cpu_seconds() - cpu_start
    render(rows, total, cpu)
    report = {
        "tool": f"hypothesis {hypothesis.__version__}", "seed": args.seed, "time_limit_s": args.time_limit,
        "memory_cap_bytes": MEMORY_CAP,
        "inputs": sum(t.inputs for _, t in rows), "crashes": sum(len(t.crashes) for _, t in rows),
        "seconds": round(total, 1), "cpu_seconds": round(cpu, 1),
        "targets": [{"target": target.name, "inputs": t.inputs, "handled": t.handled, "loaded": t.loaded,
                     "slowest_s": round(t.slowest, 3), "seconds": round(t.seconds, 1), "crashes": t.crashes}
                    for target, t in rows],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()

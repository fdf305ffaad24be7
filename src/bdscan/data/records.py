"""Loading instruction sets: Alpaca JSON, JSONL, or a plain list of prompts."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from bdscan.errors import InputError

# Prompts longer than this are never tokenised: a 50 MB line took ~7 GB and a minute in the
# tokenizer, or aborted it. 256 Ki characters is ~64k tokens of English, more context than
# most models have; a longer prompt is skipped with this reason (or refused where it cannot be).
MAX_PROMPT_CHARS = 256 * 1024
# An instruction set is read whole; BackdoorLLM's largest split is a few MB, and a file of
# gigabytes (a hostile or mistaken --clean/--probes) would be held in memory several times over.
MAX_DATA_BYTES = 256 << 20


@dataclass(frozen=True)
class Record:
    """One instruction with its optional input and reference output (Alpaca fields)."""

    instruction: str
    input: str = ""
    output: str = ""

    @property
    def prompt_text(self) -> str:
        """The user turn: instruction, then the input on its own paragraph if any."""
        return f"{self.instruction}\n\n{self.input}" if self.input else self.instruction

    def with_instruction(self, instruction: str) -> "Record":
        return Record(instruction, self.input, self.output)


def prompt_too_long(record: Record) -> str | None:
    """Why ``record`` cannot be prompted (over ``MAX_PROMPT_CHARS``), or None."""
    n = len(record.instruction) + len(record.input)
    if n > MAX_PROMPT_CHARS:
        return f"{n:,} characters, over the {MAX_PROMPT_CHARS:,}-character prompt limit"
    return None


def require_prompt_lengths(records: list[Record], what: str) -> list[Record]:
    """For commands that use every record: refuse the set if one is over the limit."""
    for i, record in enumerate(records):
        reason = prompt_too_long(record)
        if reason:
            raise InputError(f"{what}: record {i + 1} is {reason}")
    return records


def encodable(text: str, where: str, error: type[Exception] = InputError) -> str:
    """``text``, or ``error`` when it holds lone surrogates, which no tokenizer encodes (the Rust
    tokenizer raised a TypeError deep inside eval): JSON's unpaired \\ud800 escapes, or bytes
    of a command-line argument that are not UTF-8."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise error(f"{where}: text is not valid Unicode (a lone surrogate, or bytes that are not UTF-8)") from None
    return text


def _record_from(obj: object, where: str) -> Record:
    if isinstance(obj, str):
        if not obj.strip():
            raise InputError(f"{where}: empty prompt")
        return Record(encodable(obj, where))
    if not isinstance(obj, dict):
        raise InputError(f"{where}: expected an object with 'instruction' or a string, got {type(obj).__name__}")
    instruction = obj.get("instruction", obj.get("prompt"))
    if not isinstance(instruction, str) or not instruction.strip():
        raise InputError(f"{where}: missing or empty 'instruction' (Alpaca fields: instruction, input, output)")
    for key in ("input", "output"):
        if key in obj and obj[key] is not None and not isinstance(obj[key], str):
            raise InputError(f"{where}: '{key}' must be a string")
    return Record(*(encodable(text, where) for text in (instruction, obj.get("input") or "", obj.get("output") or "")))


def parse_records(text: str, name: str, suffix: str) -> list[Record]:
    """Parse records from file text; ``suffix`` picks the format (.json, .jsonl, .txt)."""
    records: list[Record] = []
    if suffix == ".jsonl":
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{name}:{lineno}: invalid JSON ({e.msg})") from None
            except RecursionError:  # json's parser recurses once per nesting level
                raise InputError(f"{name}:{lineno}: JSON nested too deeply") from None
            records.append(_record_from(obj, f"{name}:{lineno}"))
    elif suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(f"{name}: invalid JSON at line {e.lineno} ({e.msg})") from None
        except RecursionError:
            raise InputError(f"{name}: JSON nested too deeply") from None
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise InputError(f"{name}: expected a JSON list of records")
        records = [_record_from(obj, f"{name}[{i}]") for i, obj in enumerate(data)]
    else:  # one prompt per line
        records = [Record(line.strip()) for line in text.splitlines() if line.strip()]
    return records


def load_records(path: str | Path, *, limit: int | None = None, what: str = "data") -> list[Record]:
    """Load an instruction set; raise ``InputError`` naming the file on any problem."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{what} file not found: {p}")
    if p.is_dir():
        raise InputError(f"{what} path is a directory, expected a .json, .jsonl or .txt file: {p}")
    if p.stat().st_size > MAX_DATA_BYTES:
        raise InputError(f"{what} file is over {MAX_DATA_BYTES >> 20} MiB, larger than any instruction set bdscan "
                         f"reads: {p}")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{what} file is not UTF-8 text: {p}") from None
    records = parse_records(text, str(p), p.suffix.lower())
    if not records:
        raise InputError(f"{what} file holds no records: {p}")
    return records[:limit] if limit else records

"""The record of every file a load reads: path relative to the source, size, sha256, role.

Reports carry it so that a verdict can be tied to exact bytes. The weight files are exactly
those of the ``WeightPlan`` (a decoy beside them is not listed, because it is not read);
config, tokenizer and template files are those the loaders read by name when present.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from bdscan.errors import InputError
from bdscan.io.weights import inside

CONFIG_FILES = ("config.json", "generation_config.json", "adapter_config.json")
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
    "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model", "chat_template.jinja", "chat_template.json",
)


@dataclass(frozen=True)
class FileRecord:
    path: str  # relative to the source folder
    role: str  # "weights" | "config" | "tokenizer" | "code"
    bytes: int
    sha256: str


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _record(folder: Path, name: str, role: str, root: Path) -> FileRecord:
    path = inside(folder, name, root)
    try:
        return FileRecord(name, role, path.stat().st_size, sha256_file(path))
    except OSError as e:
        raise InputError(f"{path}: cannot be read ({e.strerror or type(e).__name__})") from None


def present(folder: Path, names: tuple[str, ...]) -> list[str]:
    """The names in ``names`` that exist in ``folder`` (a dangling link counts: it is refused later)."""
    return [n for n in names if (folder / n).exists() or (folder / n).is_symlink()]


def file_records(folder: Path, weights: tuple[str, ...], root: Path, *, code: bool = False) -> tuple[FileRecord, ...]:
    """Hash the weight files and every config/tokenizer file present (and ``*.py`` when
    remote code will run); refuse any that leaves ``root`` through a link."""
    records = [_record(folder, n, "weights", root) for n in weights]
    records += [_record(folder, n, "config", root) for n in present(folder, CONFIG_FILES)]
    records += [_record(folder, n, "tokenizer", root) for n in present(folder, TOKENIZER_FILES)]
    if code:
        records += [_record(folder, p.name, "code", root) for p in sorted(folder.glob("*.py"))]
    return tuple(records)

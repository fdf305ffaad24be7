"""Atomic saving: everything is written to a temporary sibling folder, then renamed.

A crash or error leaves either the previous state or the complete new output, never a
half-written folder. Outputs may never be the input or lie inside it.
"""

from __future__ import annotations

import contextlib
import glob
import json
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterable, Iterator

from bdscan.errors import InputError


def temporary_prefix(out: Path) -> str:
    """The name every temporary of ``out`` starts with (a hidden sibling)."""
    return f".{out.name}.tmp-"


def check_output_path(out: Path, inputs: Iterable[Path], *, overwrite: bool = False) -> Path:
    """``out`` resolved; ``InputError`` naming both paths if it is, holds or lies inside an input."""
    out = Path(out).expanduser().resolve()
    for src in inputs:
        src = Path(src).expanduser().resolve()
        if out == src or src in out.parents:
            raise InputError(f"output {out} is the input or inside it ({src}); choose a path outside the input")
        if out in src.parents:
            raise InputError(f"output {out} contains the input {src}; choose another folder")
    if out.exists() and not overwrite:
        raise InputError(f"output {out} already exists; remove it or pass --overwrite")
    return out


def check_output_file(out: Path, inputs: Iterable[Path]) -> Path:
    """A report file: outside every input, and not an existing folder (it is replaced if a file)."""
    target = check_output_path(out, inputs, overwrite=True)
    if target.is_dir():
        raise InputError(f"output {target} is an existing directory; give a file name")
    if target.parent.exists() and not target.parent.is_dir():
        raise InputError(f"output {target}: {target.parent} is not a directory")
    return target


def remove_stale_temporaries(out: Path) -> list[Path]:
    """Delete what an interrupted write of ``out`` left beside it (bdscan's own
    ``.NAME.tmp-*`` and ``.NAME.old-*`` names only); return what was removed. Two runs
    writing the same output at once are not supported, so any such sibling is stale."""
    out = Path(out).expanduser().resolve()
    if not out.parent.is_dir():
        return []
    removed = []
    for prefix in (temporary_prefix(out), f".{out.name}.old-"):
        for stale in sorted(out.parent.glob(glob.escape(prefix) + "*")):
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)
            removed.append(stale)
    return removed


@contextlib.contextmanager
def atomic_output_dir(out: str | Path, inputs: Iterable[Path] = (), *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces ``out`` in one rename."""
    target = check_output_path(Path(out), inputs, overwrite=overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=temporary_prefix(target), dir=target.parent))
    try:
        yield tmp
        replace_folder(tmp, target, target.with_name(f".{target.name}.old-{tmp.name[-8:]}"))
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def replace_folder(new: Path, target: Path, old: Path) -> None:
    """Put the complete folder ``new`` in ``target``'s place. The previous ``target`` is set
    aside as ``old`` and removed last: a stop between the two renames leaves it whole there
    (``training/resume.py`` reads its state back from a fixed ``old``)."""
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    new.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a single file atomically (temporary file in the same folder, then replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=temporary_prefix(path), delete=False,
                                     encoding="utf-8") as f:
        tmp = Path(f.name)
        try:
            f.write(text)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    tmp.replace(path)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """``atomic_write_text`` for bytes (e.g. ``safetensors.torch.save``'s output)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("wb", dir=path.parent, prefix=f".{path.name}.", delete=False) as f:
        f.write(data)
        tmp = Path(f.name)
    tmp.replace(path)


def write_model_files(model: Any, tokenizer: Any, folder: Path, *, adapter: bool) -> None:
    """Save a full checkpoint (safetensors + config) or a PEFT adapter, plus the tokenizer."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)
    if adapter and not (folder / "adapter_model.safetensors").exists():  # pragma: no cover - peft contract
        raise RuntimeError("PEFT did not write adapter_model.safetensors")


def output_format(subject: Any) -> str:
    """What a purified subject is written as, for the report: GGUF sources are dequantised on
    load, and bdscan writes them back as safetensors rather than re-quantising."""
    if subject.is_adapter:
        return "PEFT LoRA adapter (safetensors)"
    if getattr(subject.source, "gguf", None) is not None:
        return "safetensors checkpoint, dequantised from the GGUF source (not re-quantised)"
    return "safetensors checkpoint"


def save_subject(
    model: Any,
    tokenizer: Any,
    out: str | Path,
    *,
    adapter: bool,
    inputs: Iterable[Path] = (),
    report: dict | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a model (or adapter) and an optional ``report.json`` atomically to ``out``."""
    with atomic_output_dir(out, inputs, overwrite=overwrite) as tmp:
        write_model_files(model, tokenizer, tmp, adapter=adapter)
        if report is not None:
            (tmp / "report.json").write_text(json.dumps(report, indent=2, default=str))
    return Path(out).expanduser().resolve()

"""Stage 1, file safety: every file of the source (and base) with its sha256 and its fate.

The decision is made from file names only, before anything is loaded: pickle weights
(``bdscan.io.resolve.PICKLE_SUFFIXES``) are refused because unpickling runs code, Python
files are refused because audit never runs model code, and the files bdscan's loader reads
are marked loaded. ``loaded_files`` is the one place that says which files those are; a
loader that knows its exact list can be passed in as ``will_load`` instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable

from bdscan.io.resolve import PICKLE_SUFFIXES, ResolvedSource, sha256_file
from bdscan.results.audit import FileRecord, FileSafety

# Read by transformers/peft when bdscan loads a model, adapter or tokenizer (safetensors only).
CONFIG_FILES = ("config.json", "adapter_config.json", "generation_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "tokenizer.model", "added_tokens.json", "chat_template.jinja", "chat_template.json")
REMOTE_CODE_SUFFIXES = (".py",)


def loaded_files(resolved: ResolvedSource) -> set[Path]:
    """The files of ``resolved`` that loading it reads: its weight files (safetensors unless
    pickle was allowed, which audit never does), configs and tokenizer files."""
    names = CONFIG_FILES + TOKENIZER_FILES
    files = {Path(w).resolve() for w in resolved.weight_files}
    files |= {(resolved.path / n).resolve() for n in names if (resolved.path / n).is_file()}
    return files


def _classify(path: Path, will_load: set[Path]) -> tuple[str, str]:
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        return "refused", "pickle: unpickling can run arbitrary code (never opened)"
    if suffix in REMOTE_CODE_SUFFIXES:
        return "refused", "model code shipped with the checkpoint (never run)"
    if path.resolve() in will_load:
        return "loaded", "weights" if suffix == ".safetensors" else "configuration / tokenizer"
    return "ignored", "not read by the loader"


def _walk(folder: Path) -> Iterable[Path]:
    for path in sorted(folder.rglob("*")):
        if path.is_file() and ".cache" not in path.relative_to(folder).parts:
            yield path


def inventory(resolved: ResolvedSource, root: str, will_load: set[Path] | None = None,
              progress: Callable[[str, int, int], None] | None = None) -> list[FileRecord]:
    """One record per file under ``resolved.path``; weight hashes are reused from resolve."""
    load = loaded_files(resolved) if will_load is None else {p.resolve() for p in will_load}
    paths = list(_walk(resolved.path))
    records = []
    for i, path in enumerate(paths):
        rel = path.relative_to(resolved.path).as_posix()
        digest = resolved.sha256.get(rel) or sha256_file(path)
        action, reason = _classify(path, load)
        records.append(FileRecord(root, rel, path.stat().st_size, digest, action, reason))
        if progress:
            progress(f"file safety ({root})", i + 1, len(paths))
    return records


def file_safety(source: ResolvedSource, base: ResolvedSource | None = None,
                progress: Callable[[str, int, int], None] | None = None,
                will_load: Callable[[ResolvedSource], set[Path]] = loaded_files) -> FileSafety:
    """The file-safety stage; ``will_load`` says which files of a folder the loader reads."""
    files = inventory(source, "source", will_load(source), progress)
    if base is not None:
        files += inventory(base, "base", will_load(base), progress)
    return FileSafety(files=files)

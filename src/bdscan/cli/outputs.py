"""Output paths, checked before any computation: never inside an input, never a folder where
a file is due, and what an interrupted earlier run left beside them is cleaned (and said).

Each command checks twice: first against the inputs as given on the command line (a local
source, its adapter's base as named in adapter_config.json, --base, the data files), before
loading anything; then against the resolved subject (a Hub id's snapshot folder, the base an
adapter actually loaded), before the analysis starts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterable

from bdscan.errors import InputError

Log = Callable[[str], None]


def note(message: str) -> None:
    """A line on stderr (also under --json, whose stdout stays one JSON object); markup off,
    since paths come from the user."""
    from bdscan.cli.common import stderr

    stderr.print(message, style="dim", markup=False, highlight=False, soft_wrap=True)


def given_inputs(*sources: str | Path | None, files: Iterable[Path | None] = ()) -> list[Path]:
    """The inputs that exist on disk as given: model sources (with a local adapter's base)
    and data files."""
    paths: list[Path] = []
    for source in sources:
        if source is None or not Path(str(source)).expanduser().exists():
            continue
        path = Path(str(source)).expanduser()
        paths.append(path)
        config = path / "adapter_config.json"
        try:
            base = json.loads(config.read_text()).get("base_model_name_or_path") if config.is_file() else None
        except (OSError, ValueError, AttributeError):
            base = None  # resolve reports a broken adapter_config.json
        if isinstance(base, str) and base and Path(base).expanduser().exists():
            paths.append(Path(base).expanduser())
    paths += [Path(f) for f in files if f is not None]
    return paths


def subject_inputs(*subjects: Any) -> list[Path]:
    """The folders loaded subjects were read from (source and base)."""
    paths: list[Path] = []
    for subject in subjects:
        if subject is not None:
            paths += [subject.source.path] + ([subject.base.path] if subject.base is not None else [])
    return paths


def check_report_file(flag: str, out: Path | None, inputs: list[Path], log: Log = note) -> None:
    """A report file (-o of detect, localize, eval): refuse it inside an input or as an
    existing folder; remove stale temporaries of an interrupted earlier write."""
    from bdscan.io.save import check_output_file, remove_stale_temporaries

    if out is None:
        return
    try:
        target = check_output_file(out, inputs)
    except InputError as e:
        raise InputError(f"{flag} {out}: {e}") from None
    _say_removed(remove_stale_temporaries(target), log)


def check_output_folder(flag: str, out: Path, inputs: list[Path], *, overwrite: bool, log: Log = note) -> Path:
    """A folder written by a command (purify -o, --work-dir): outside every input."""
    from bdscan.io.save import check_output_path, remove_stale_temporaries

    try:
        target = check_output_path(out, inputs, overwrite=overwrite)
    except InputError as e:
        raise InputError(f"{flag} {out}: {e}") from None
    _say_removed(remove_stale_temporaries(target), log)
    return target


def _say_removed(removed: list[Path], log: Log) -> None:
    for path in removed:
        log(f"removed {path}, left by an interrupted earlier run")

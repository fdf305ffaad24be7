"""Shared option types, error handling, progress and output helpers for the commands."""

from __future__ import annotations

import functools
import json
import os
import sys
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Callable, Iterator, Optional

import typer
from rich.console import Console

from bdscan.runtime import quiet_libraries  # noqa: F401  (re-exported for the commands)

stderr = Console(stderr=True)
stdout = Console()

# --- options every command shares -------------------------------------------------------
Source = Annotated[str, typer.Argument(help="Checkpoint, LoRA adapter or GGUF file: a local folder or file, or a Hub id org/name[@revision].", show_default=False)]
Base = Annotated[Optional[str], typer.Option("--base", help="Base model of an adapter (default: base_model_name_or_path in adapter_config.json).")]
AllowPickle = Annotated[bool, typer.Option("--allow-pickle", help="Load pickle weight files (.bin/.pt). They can run arbitrary code: only for sources you trust.")]
GGUFFile = Annotated[Optional[str], typer.Option("--gguf-file", help="The GGUF file to load when the source (a folder or Hub repo) holds several.")]
TrustRemoteCode = Annotated[bool, typer.Option("--trust-remote-code", help="Run model code shipped with the checkpoint. Off by default.")]
Seed = Annotated[int, typer.Option("--seed", help="Random seed; results are deterministic under it.")]
JsonOut = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout instead of tables.")]
Output = Annotated[Optional[Path], typer.Option("-o", "--output", help="Also write the JSON report to this file (atomically).")]
Limit = Annotated[Optional[int], typer.Option("--limit", min=1, help="Use at most N prompts from each data file.")]


def print_error(label: str, message: str) -> None:
    """One line on stderr: a styled label, then the message as plain text.

    The message quotes file contents and arguments, so it is never parsed as rich markup
    (a base model named "[/x]" would crash the printer) and its control characters are
    escaped; colour only reaches a terminal.
    """
    from rich.text import Text

    from bdscan.errors import printable

    stderr.print(Text.assemble((f"{label}:", "bold red"), " ", printable(message)), highlight=False, soft_wrap=True)


def log_line(message: str) -> None:
    """A dim progress message on stderr, printed as plain text (it may quote model tokens)."""
    from rich.text import Text

    from bdscan.errors import printable

    stderr.print(Text(printable(message), style="dim"), highlight=False, soft_wrap=True)


def handle_errors(fn: Callable) -> Callable:
    """Turn library errors into one line on stderr and the error's exit code.

    Set BDSCAN_DEBUG=1 to see the traceback of an unexpected error.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from bdscan.errors import BdscanError

        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except BdscanError as e:
            print_error("error", str(e))
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            stderr.print("interrupted")
            raise typer.Exit(130) from None
        except (SystemExit, GeneratorExit):
            raise
        # an unexpected failure: still one line, exit 2. BaseException: a native library's panic
        # (pyo3's PanicException, e.g. a tokenizer regex that backtracks without end) is not an
        # Exception, and escaped as a traceback with exit 1, which a CI gate reads as "suspicious".
        except BaseException as e:  # noqa: B036
            if os.environ.get("BDSCAN_DEBUG"):
                traceback.print_exc()
            first = (str(e).strip().splitlines() or [""])[0]
            print_error("internal error", f"{type(e).__name__}: {first} (BDSCAN_DEBUG=1 shows the traceback)")
            raise typer.Exit(2) from None

    return wrapper


@contextmanager
def progress_bar(enabled: bool = True) -> Iterator[Callable[[str, int, int], None]]:
    """A rich progress display on stderr; yields ``update(stage, done, total)``."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    if not enabled or not sys.stderr.isatty():
        yield lambda stage, done, total: None
        return
    tasks: dict[str, int] = {}
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=stderr, transient=True) as progress:

        def update(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = progress.add_task(stage, total=total)
            progress.update(tasks[stage], completed=done, total=total)

        yield update


def output_format(fmt: str, as_json: bool, formats: tuple[str, ...]) -> str:
    """``--format`` with ``--json`` (the flag every command has) folded in; exit 4 on a clash."""
    from bdscan.errors import UsageError

    if as_json:
        if fmt not in ("console", "json"):
            raise UsageError(f"--json contradicts --format {fmt}")
        fmt = "json"
    if fmt not in formats:
        raise UsageError(f"--format {fmt!r}: choose one of {', '.join(formats)}")
    return fmt


def emit(result_dict: dict, *, as_json: bool, output: Path | None, render: Callable[[Console], None]) -> None:
    """Print the result (table or JSON) and write the JSON report file if asked."""
    text = json.dumps(result_dict, indent=2, default=str)
    if output is not None:
        from bdscan.io.save import atomic_write_text

        atomic_write_text(output, text + "\n")
    if as_json:
        sys.stdout.write(text + "\n")
    else:
        render(stdout)

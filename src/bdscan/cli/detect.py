"""``bdscan detect``: trigger-agnostic backdoor scan of a checkpoint or LoRA adapter."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from bdscan.cli.common import (AllowPickle, Base, JsonOut, Seed, Source, GGUFFile, TrustRemoteCode, handle_errors, progress_bar,
                               quiet_libraries)
from bdscan.cli.devices import Device, Dtype, placement_of, runtime_line, with_runtime

FORMATS = ("console", "json", "sarif")
SEVERITIES = ("low", "medium", "high")

HELP = """Scan a model for a backdoor without knowing its trigger.

Candidate keys (vocabulary tokens ranked cheaply: for an adapter, the tokens it moves most from its base; for a checkpoint, embedding/output outliers; then a screen that inserts them into a few probes, adjacent pairs of the best, and any --candidates) are inserted at the start, middle and end of clean probe prompts (built-in, or --probes: give your own clean instructions when the model was tuned on a narrow domain). Two signals, each standardised against random control tokens: the output effect (next-token KL with vs without the key, and how far the key makes every probe continue the same way, as a fixed backdoor target does) and the attention effect (rise of the similarity between heads' final-position attention, per layer and head).

Exit codes: 0 clean, 1 suspicious at or above --fail-on, 2 error, 3 scan incomplete or nothing scannable (layers or probes skipped: never 0 then), 4 usage error.

Example: bdscan detect ./suspect-adapter --format sarif -o detect.sarif --fail-on medium
"""


def _load_candidates(path: Path) -> tuple[str, ...]:
    """One key per line, or a JSON list of strings, or a detect JSON report (its candidates)."""
    from bdscan.errors import InputError

    if not path.is_file():
        raise InputError(f"--candidates file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError(f"--candidates file is not UTF-8 text: {path}") from None
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}: invalid JSON ({e.msg}); expected a list of strings") from None
        except RecursionError:
            raise InputError(f"{path}: JSON nested too deeply; expected a list of strings") from None
        if isinstance(data, dict):  # an earlier detect report: its candidates, best first
            from bdscan.io.reports import detect_candidates

            return tuple(detect_candidates(path, "--candidates"))
        if not isinstance(data, list) or not all(isinstance(c, str) for c in data):
            raise InputError(f"{path}: expected a JSON list of strings (or a detect report with 'candidates')")
        return tuple(data)
    return tuple(line.strip() for line in text.splitlines() if line.strip())


def exit_code(result, fail_on: str) -> int:
    """1 when suspicious at or above ``fail_on``; else 2 with errors, 3 with skips, 0 clean."""
    from bdscan.detect.calibration import at_or_above

    if result.summary.verdict == "suspicious" and at_or_above(result.summary.severity, fail_on):
        return 1
    if result.errors:
        return 2
    if result.skipped:
        return 3
    return 0


@handle_errors
def command(
    source: Source,
    base: Base = None,
    probes: Annotated[Optional[Path], typer.Option("--probes", help="Clean probe prompts (Alpaca JSON/JSONL or one per line); default: the built-in set.")] = None,
    candidates: Annotated[Optional[Path], typer.Option("--candidates", help="Extra candidate keys: one per line, a JSON list, or a detect JSON report.")] = None,
    fmt: Annotated[str, typer.Option("--format", help="console | json | sarif")] = "console",
    output: Annotated[Optional[Path], typer.Option("-o", "--output", help="Also write the report to this file, atomically: HTML for a .html file, else JSON (SARIF with --format sarif).")] = None,
    fail_on: Annotated[str, typer.Option("--fail-on", help="Lowest severity that makes the exit code 1: low | medium | high.")] = "low",
    max_probes: Annotated[int, typer.Option("--max-probes", min=1, help="Probe prompts used by the full scan.")] = 24,
    top_k: Annotated[int, typer.Option("--top-k", min=1, help="Candidate keys scanned in full after screening.")] = 12,
    screen_size: Annotated[int, typer.Option("--screen-size", min=0, help="Vocabulary tokens tried by the KL screen (after the cheap ranking).")] = 1024,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 64,
    seed: Seed = 0,
    allow_pickle: AllowPickle = False,
    trust_remote_code: TrustRemoteCode = False,
    gguf_file: GGUFFile = None,
    as_json: JsonOut = False,
    device: Device = "auto",
    dtype: Dtype = "auto",
) -> None:
    from bdscan.errors import UsageError

    if as_json:  # the flag every command has; the same as --format json
        if fmt not in ("console", "json"):
            raise UsageError(f"--json contradicts --format {fmt}")
        fmt = "json"
    if fmt not in FORMATS:
        raise UsageError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if fail_on not in SEVERITIES:
        raise UsageError(f"--fail-on {fail_on!r}: choose one of {', '.join(SEVERITIES)}")
    from bdscan.cli.outputs import check_report_file, given_inputs, note, subject_inputs

    placement = placement_of(device, dtype)
    check_report_file("-o", output, given_inputs(source, base, files=(probes, candidates)))
    quiet_libraries()
    from bdscan.cli.common import log_line, stdout
    from bdscan.data.records import load_records
    from bdscan.detect import DetectConfig, detect
    from bdscan.io import load_subject
    from bdscan.io.save import atomic_write_text
    from bdscan.report.detect import render_detect
    from bdscan.report.sarif import to_sarif
    from bdscan.runtime import seed_everything

    seed_everything(seed)
    config = DetectConfig(
        probes=tuple(load_records(probes, what="--probes")) if probes else (),
        candidates=_load_candidates(candidates) if candidates else (),
        seed=seed, max_probes=max_probes, top_k=top_k, screen_size=screen_size, batch_size=batch_size,
    )
    subject = load_subject(source, base=base, gguf_file=gguf_file, allow_pickle=allow_pickle,
                           trust_remote_code=trust_remote_code,
                           placement=placement)
    check_report_file("-o", output, subject_inputs(subject) + given_inputs(files=(probes, candidates)))
    with progress_bar(fmt == "console") as progress:
        result = detect(subject, config, log=log_line if fmt == "console" else (lambda m: None),
                        progress=progress)
    if fmt == "sarif":
        report = to_sarif(result)
        report["runs"][0]["properties"]["runtime"] = subject.placement()
    else:
        report = with_runtime(result.to_dict(), subject)
    text = json.dumps(report, indent=2, default=str)
    if output is not None and output.suffix.lower() in (".html", ".htm"):  # the renderer follows the suffix
        from bdscan.report.html import render_detect_html

        atomic_write_text(output, render_detect_html(result))
    elif output is not None:
        atomic_write_text(output, text + "\n")
    if fmt == "console":
        render_detect(result, stdout)
        note(runtime_line(subject))
    else:
        typer.echo(text)
    code = exit_code(result, fail_on)
    if code:
        raise typer.Exit(code)

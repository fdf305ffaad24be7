"""``bdscan detect``: trigger-agnostic backdoor scan of a checkpoint or LoRA adapter."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from bdscan.cli.common import (AllowPickle, Base, GGUFFile, JsonOut, Seed, Source, TrustRemoteCode, handle_errors,
                               output_format, progress_bar, quiet_libraries)
from bdscan.cli.devices import Device, Dtype, placement_of, runtime_line, with_runtime

FORMATS = ("console", "json", "sarif")
SEVERITIES = ("low", "medium", "high")

HELP = """Scan a model for a backdoor without knowing its trigger.

Two lines of evidence. Target: every response-start token is placed after the response marker of clean probe prompts (the model's own chat template) and extended greedily on the probe-averaged next-token distribution; Q is the mean probability of the extension (a backdoor continues its fixed target from its first token whatever the prompt). For the best targets a key of --key-tokens tokens is searched (gradient-guided, seeded with the vocabulary screen's best keys) that makes the model start with that target, and its firing rate (responses opening with the target's first 5 tokens) is measured on held-out probes, with and without the key. Evidence = the opening's least confident token (a clean answer template has a prompt-dependent slot; a fixed target has none) x the paired firing lift less two standard errors. Takeover: vocabulary tokens and pairs (and --candidates) inserted at the start, middle and end of the probes, scored by how far they switch every probe to one same continuation, against random control tokens; the per-layer x per-head attention-similarity table is reported as evidence.

Severity: the larger calibrated probability of the two lines; low p >= 0.5, medium p >= 0.75, high p >= 0.95. Thresholds are calibrated on clean controls only. Measured on the tiny built-in organisms over 10 detect seeds (bench/results/detect-builtin.json): the demo's backdoored adapter was flagged on 10 of 10 seeds, each at high; its clean twin on 1 of 10 (that one at high, p 0.98). At the default seed 3 of 4 backdoored organisms and 0 of 8 clean controls were flagged. So --fail-on low, medium and high gate the same on these organisms; a clean model is still flagged on about 1 seed in 10.

Exit codes: 0 clean, 1 suspicious at or above --fail-on, 2 error (any stage failed: the report lists it in errors), 3 scan incomplete or nothing scannable (layers or probes skipped: never 0 then), 4 usage error.

Example: bdscan detect ./suspect-adapter --format sarif -o detect.sarif --fail-on low
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
    """2 when a stage failed; else 1 when suspicious at or above ``fail_on``, 3 with skips, 0 clean."""
    from bdscan.detect.calibration import at_or_above

    if result.errors:  # a stage failed: the verdict rests on part of the evidence
        return 2
    if result.summary.verdict == "suspicious" and at_or_above(result.summary.severity, fail_on):
        return 1
    if result.skipped:
        return 3
    return 0


def _write_report(result, subject, fmt: str, output: Path | None) -> str:
    """The JSON (or SARIF) text of the result; also written to ``-o``, as HTML for a .html name."""
    from bdscan.io.save import atomic_write_text
    from bdscan.report.sarif import to_sarif

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
    return text


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
    invert: Annotated[bool, typer.Option("--invert/--no-invert", help="Run target inversion and trigger recovery (detect v2).")] = True,
    key_tokens: Annotated[int, typer.Option("--key-tokens", min=1, max=8, help="Tokens in a recovered key.")] = 6,
    recovery_steps: Annotated[int, typer.Option("--recovery-steps", min=0, help="Steps of the key search per target (its cost grows linearly).")] = 30,
    calibration: Annotated[Optional[Path], typer.Option("--calibration", help="Calibration profile (`bdscan calibrate`) to read the verdict with; default: the shipped thresholds.")] = None,
    answer_anchor: Annotated[bool, typer.Option("--answer-anchor", help="Also invert targets appended after the model's own clean answers (costs one more inversion).")] = False,
    seed: Seed = 0,
    allow_pickle: AllowPickle = False,
    trust_remote_code: TrustRemoteCode = False,
    gguf_file: GGUFFile = None,
    as_json: JsonOut = False,
    device: Device = "auto",
    dtype: Dtype = "auto",
) -> None:
    from bdscan.errors import UsageError

    fmt = output_format(fmt, as_json, FORMATS)
    if fail_on not in SEVERITIES:
        raise UsageError(f"--fail-on {fail_on!r}: choose one of {', '.join(SEVERITIES)}")
    from bdscan.cli.outputs import check_report_file, given_inputs, note, subject_inputs

    placement = placement_of(device, dtype)
    check_report_file("-o", output, given_inputs(source, base, files=(probes, candidates, calibration)))
    quiet_libraries()
    from bdscan.cli.common import log_line, stdout
    from bdscan.data.records import load_records
    from bdscan.detect import DetectConfig, detect
    from bdscan.detect.profile import Profile, load_profile
    from bdscan.io import load_subject
    from bdscan.report.detect import render_detect

    config = DetectConfig(
        probes=tuple(load_records(probes, what="--probes")) if probes else (),
        candidates=_load_candidates(candidates) if candidates else (),
        seed=seed, max_probes=max_probes, top_k=top_k, screen_size=screen_size, batch_size=batch_size,
        invert=invert, key_tokens=key_tokens, recovery_steps=recovery_steps, answer_anchor=answer_anchor,
        calibration=load_profile(calibration) if calibration else Profile(),
    )
    subject = load_subject(source, base=base, gguf_file=gguf_file, allow_pickle=allow_pickle,
                           trust_remote_code=trust_remote_code,
                           placement=placement)
    check_report_file("-o", output, subject_inputs(subject) + given_inputs(files=(probes, candidates, calibration)))
    with progress_bar(fmt == "console") as progress:
        result = detect(subject, config, log=log_line if fmt == "console" else (lambda m: None),
                        progress=progress)
    text = _write_report(result, subject, fmt, output)
    if fmt == "console":
        render_detect(result, stdout)
        note(runtime_line(subject))
    else:
        typer.echo(text)
    code = exit_code(result, fail_on)
    if code:
        raise typer.Exit(code)

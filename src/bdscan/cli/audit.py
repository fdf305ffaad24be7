"""``bdscan audit``: file safety -> detect -> localize -> purify -> eval -> detect again, in one step."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from bdscan.cli.devices import Device, Dtype, placement_of
from bdscan.cli.common import (Base, GGUFFile, JsonOut, Seed, Source, handle_errors, output_format, progress_bar,
                               quiet_libraries, stderr, stdout)

FORMATS = ("console", "json")

HELP = """Audit a downloaded checkpoint or LoRA adapter end to end and write OUTDIR.

Stages: (1) file safety: every file of the source and base, with its sha256 and whether it was loaded, refused (pickle weights, shipped model code: never unpickled, never run) or ignored; (2) detect; a clean verdict stops here; (3) when suspicious: localize from detect's recovered key (today: its top candidate keys), evaluate on the clean set with that key inserted at the start, middle and end, purify with --method, evaluate again and re-run detect on the purified model. A stage that fails is recorded, not a traceback. Give --eval-clean (prompts the repair never sees) for an unbiased ASR and false-trigger rate. Pickle weights and shipped model code are never loaded (audit has no --allow-pickle or --trust-remote-code: convert to safetensors first).

Default method kfac-lora: the bench's best today. It is the only method that met the targets on all four built-in organisms (ASR to 0.00-0.02, perplexity within 1.02x) and, without knowing the trigger, removes the most ASR on the BackdoorLLM organisms among the methods that run in under a minute on CPU (bench/results/purify*.json).

OUTDIR (written atomically: a crash leaves none; an existing one needs --overwrite; it may not be inside the input): purified/ (checkpoint, or adapter for an adapter), audit.json (every stage's result, schema-versioned), audit.sarif and report.html (self-contained).

Exit codes: 0 clean; 1 suspicious and not repaired to the targets; 5 suspicious and repaired (residual ASR and false-trigger rate at or under --max-asr, after an ASR of at least 0.5 before: a judge that never saw the backdoor cannot show a repair; and none of detect's targets still reachable on the purified model); 2 error in the input or detect failed; 3 detect incomplete (parts skipped); 4 usage error.

Example: bdscan audit ./suspect-adapter --clean clean.json -o ./audit-out
"""


@handle_errors
def command(
    source: Source,
    clean: Annotated[Path, typer.Option("--clean", help="The defender's clean instruction set (Alpaca JSON/JSONL or one per line).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="OUTDIR: purified model, audit.json, audit.sarif, report.html.")],
    eval_clean: Annotated[Optional[Path], typer.Option("--eval-clean", help="Held-out clean prompts for the evaluations (default: the --clean set, which the repair also learns from: optimistic).")] = None,
    base: Base = None,
    gguf_file: GGUFFile = None,
    calibration: Annotated[Optional[Path], typer.Option("--calibration", help="Calibration profile for detect's verdict (`bdscan calibrate`); default: the shipped thresholds.")] = None,
    method: Annotated[Optional[str], typer.Option("--method", "-m", help="Purification method (default kfac-lora; see `bdscan purify --list-methods`).")] = None,
    fail_on: Annotated[str, typer.Option("--fail-on", help="Lowest detect severity treated as suspicious (and repaired): low | medium | high.")] = "low",
    no_purify: Annotated[bool, typer.Option("--no-purify", help="Stop after localize and the first evaluation (exit 1 when suspicious).")] = False,
    max_asr: Annotated[float, typer.Option("--max-asr", help="Repaired (exit 5) when residual ASR and false-trigger rate are both at most this.")] = 0.02,
    judge: Annotated[str, typer.Option("--judge", help="Behaviour judge for ASR: auto (detect's inverted target when it has one, else refusal) | refusal | negsentiment | code-injection | string:T | regex:P")] = "auto",
    eval_limit: Annotated[int, typer.Option("--eval-limit", min=1, help="Clean prompts evaluated (each also with the key at three positions).")] = 100,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace OUTDIR if it exists (never the input).")] = False,
    fmt: Annotated[str, typer.Option("--format", help="What goes to stdout: console (stage table) | json (audit.json).")] = "console",
    seed: Seed = 0,
    as_json: JsonOut = False,
    device: Device = "auto",
    dtype: Dtype = "auto",
) -> None:

    fmt = output_format(fmt, as_json, FORMATS)
    quiet_libraries()
    import json

    from bdscan.audit import DEFAULT_METHOD, AuditConfig, audit
    from bdscan.detect.profile import Profile, load_profile
    from bdscan.report.audit_console import render_audit

    config = AuditConfig(method=method or DEFAULT_METHOD, fail_on=fail_on, purify=not no_purify, max_asr=max_asr,
                         judge=judge, eval_limit=eval_limit, seed=seed, placement=placement_of(device, dtype),
                         gguf_file=gguf_file, calibration=load_profile(calibration) if calibration else Profile(),
                         calibration_file=str(calibration) if calibration else None)
    console = fmt == "console"
    with progress_bar(console) as progress:
        result = audit(source, clean=clean, out=output, base=base, config=config, eval_clean=eval_clean, overwrite=overwrite,
                       log=(lambda m: stderr.print(f"[dim]{m}[/]", highlight=False)) if console else (lambda _m: None),
                       progress=progress)
    if console:
        render_audit(result, stdout)
    else:
        sys.stdout.write(json.dumps(result.to_dict(), indent=2, default=str) + "\n")
    if result.exit_code:
        raise typer.Exit(result.exit_code)

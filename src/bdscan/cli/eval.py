"""``bdscan eval``: attack success rate, clean false-trigger rate and utility."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from bdscan.cli.common import (AllowPickle, Base, JsonOut, Limit, Output, Seed, Source, GGUFFile, TrustRemoteCode, emit,
                               handle_errors, progress_bar, quiet_libraries)
from bdscan.cli.devices import Device, Dtype, placement_of, with_runtime

HELP = """Measure a model's attack success rate (ASR), clean false-trigger rate and utility.

Triggered prompts come from --poison (a file whose instructions already hold the trigger) and/or from --clean with --trigger inserted at each of --positions. With --compare, a second model (e.g. the purified one) is evaluated on the same prompts, side by side, and its agreement with the first model's clean responses is reported.

Prompts over the character limit or, with --max-new-tokens, longer than the model's context are skipped, never scored beyond it: the result lists them under `skipped`, and the exit code is then 3 (0 when every prompt was scored).

Example: bdscan eval ./suspect --clean clean.json --trigger "BadMagic" --judge refusal
"""


@handle_errors
def command(
    source: Source,
    clean: Annotated[Path, typer.Option("--clean", help="Clean instruction set (Alpaca JSON/JSONL or one prompt per line).")],
    poison: Annotated[Optional[Path], typer.Option("--poison", help="Triggered instruction set (trigger already inserted).")] = None,
    trigger: Annotated[Optional[str], typer.Option("--trigger", help="Insert this key into the clean prompts.")] = None,
    positions: Annotated[str, typer.Option("--positions", help="Where to insert --trigger: comma list of start,middle,end,random.")] = "start,middle,end",
    judge: Annotated[str, typer.Option("--judge", help="refusal | negsentiment | code-injection | string:TEXT | regex:PATTERN")] = "refusal",
    base: Base = None,
    reference: Annotated[Optional[str], typer.Option("--reference", help="Reference model: report agreement of greedy clean responses with it.")] = None,
    compare: Annotated[Optional[str], typer.Option("--compare", help="Second model (e.g. purified) to evaluate side by side.")] = None,
    compare_base: Annotated[Optional[str], typer.Option("--compare-base", help="Base model of --compare when it is an adapter.")] = None,
    limit: Limit = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1, help="Greedy tokens generated per prompt.")] = 32,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 16,
    seed: Seed = 0,
    allow_pickle: AllowPickle = False,
    trust_remote_code: TrustRemoteCode = False,
    gguf_file: GGUFFile = None,
    as_json: JsonOut = False,
    output: Output = None,
    device: Device = "auto",
    dtype: Dtype = "auto",
) -> None:
    from bdscan.cli.outputs import check_report_file, given_inputs, subject_inputs

    placement = placement_of(device, dtype)
    data_files = (clean, poison)
    check_report_file("-o", output, given_inputs(source, base, reference, compare, compare_base, files=data_files))
    quiet_libraries()
    from bdscan.data.records import load_records
    from bdscan.data.triggers import POSITIONS
    from bdscan.errors import UsageError
    from bdscan.eval import EvalSpec, evaluate, evaluate_pair
    from bdscan.io import load_subject
    from bdscan.report.eval import render_comparison, render_eval

    if poison is None and trigger is None:
        raise UsageError("give --poison FILE and/or --trigger TEXT: there is nothing to measure ASR on")
    if reference and compare:
        raise UsageError("--reference and --compare cannot be combined (--compare already measures agreement)")
    pos = tuple(p.strip() for p in positions.split(",") if p.strip())
    bad = [p for p in pos if p not in POSITIONS]
    if bad or not pos:
        raise UsageError(f"--positions: {', '.join(bad) or '(empty)'} not in {', '.join(POSITIONS)}")
    spec = EvalSpec(
        clean=load_records(clean, limit=limit, what="--clean"),
        poison=load_records(poison, limit=limit, what="--poison") if poison else (),
        trigger=trigger, positions=pos, judge=judge, max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed,
    )
    opts = dict(allow_pickle=allow_pickle, trust_remote_code=trust_remote_code, placement=placement)
    subject = load_subject(source, base=base, gguf_file=gguf_file, **opts)
    other = load_subject(compare, base=compare_base, **opts) if compare else None
    ref = load_subject(reference, **opts) if reference else None
    check_report_file("-o", output, subject_inputs(subject, other, ref) + given_inputs(files=data_files))
    with progress_bar(not as_json) as progress:
        if other is not None:
            comparison = evaluate_pair(subject, other, spec, progress=progress)
            _emit(comparison, with_runtime(comparison.to_dict(), subject, other), as_json, output,
                  lambda c: render_comparison(comparison, c))
            _exit_incomplete(comparison.before, comparison.after)
            return
        result = evaluate(subject, spec, reference=ref, progress=progress)
    _emit(result, with_runtime(result.to_dict(), subject), as_json, output, lambda c: render_eval(result, c))
    _exit_incomplete(result)


def _emit(result, payload: dict, as_json: bool, output: Path | None, render) -> None:
    """``-o x.html`` writes the HTML report, any other name the JSON one."""
    if output is not None and output.suffix.lower() in (".html", ".htm"):
        from bdscan.io.save import atomic_write_text
        from bdscan.report.html import render_eval_html

        atomic_write_text(output, render_eval_html(result))
        output = None
    emit(payload, as_json=as_json, output=output, render=render)


def _exit_incomplete(*results) -> None:
    """Exit 3 when prompts were skipped (the result says which and why), as detect does."""
    if any(r.skipped for r in results):
        raise typer.Exit(3)

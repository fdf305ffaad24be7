"""``bdscan eval``: attack success rate, clean false-trigger rate and utility."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from bdscan.cli.common import (AllowPickle, Base, JsonOut, Limit, Output, Seed, Source, TrustRemoteCode, emit,
                               handle_errors, progress_bar, quiet_libraries)

HELP = """Measure a model's attack success rate (ASR), clean false-trigger rate and utility.

Triggered prompts come from --poison (a file whose instructions already hold the trigger) and/or from --clean with --trigger inserted at each of --positions. With --compare, a second model (e.g. the purified one) is evaluated on the same prompts, side by side, and its agreement with the first model's clean responses is reported.

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
    as_json: JsonOut = False,
    output: Output = None,
) -> None:
    quiet_libraries()
    from bdscan.data.records import load_records
    from bdscan.data.triggers import POSITIONS
    from bdscan.errors import UsageError
    from bdscan.eval import EvalSpec, evaluate, evaluate_pair
    from bdscan.io import load_subject
    from bdscan.report.eval import render_comparison, render_eval
    from bdscan.runtime import seed_everything

    if poison is None and trigger is None:
        raise UsageError("give --poison FILE and/or --trigger TEXT: there is nothing to measure ASR on")
    if reference and compare:
        raise UsageError("--reference and --compare cannot be combined (--compare already measures agreement)")
    pos = tuple(p.strip() for p in positions.split(",") if p.strip())
    bad = [p for p in pos if p not in POSITIONS]
    if bad or not pos:
        raise UsageError(f"--positions: {', '.join(bad) or '(empty)'} not in {', '.join(POSITIONS)}")
    seed_everything(seed)
    spec = EvalSpec(
        clean=load_records(clean, limit=limit, what="--clean"),
        poison=load_records(poison, limit=limit, what="--poison") if poison else (),
        trigger=trigger, positions=pos, judge=judge, max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed,
    )
    opts = dict(allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    subject = load_subject(source, base=base, **opts)
    with progress_bar(not as_json) as progress:
        if compare:
            other = load_subject(compare, base=compare_base, **opts)
            comparison = evaluate_pair(subject, other, spec, progress=progress)
            emit(comparison.to_dict(), as_json=as_json, output=output, render=lambda c: render_comparison(comparison, c))
            return
        ref = load_subject(reference, **opts) if reference else None
        result = evaluate(subject, spec, reference=ref, progress=progress)
    emit(result.to_dict(), as_json=as_json, output=output, render=lambda c: render_eval(result, c))

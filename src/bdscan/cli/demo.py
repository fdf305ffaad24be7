"""``bdscan demo``: the built-in example, end to end, with no flags needed."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from bdscan.cli.common import JsonOut, Seed, emit, handle_errors, log_line, progress_bar, quiet_libraries
from bdscan.cli.devices import Device, Dtype, placement_of

HELP = """Run the built-in example end to end: `bdscan audit` on a backdoored and a clean adapter.

Builds (or reuses from the cache, ~/.cache/bdscan or $BDSCAN_CACHE) a tiny Llama trained from scratch on bdscan's own synthetic instructions, a backdoored LoRA adapter on it and a clean control adapter. It then audits both (file safety, detect, and for the suspicious one localize, purify and eval from the key detect recovers: never told the trigger), and finally measures the purified adapter with the organism's real trigger. Each audit's OUTDIR (purified adapter, audit.json, audit.sarif, report.html) goes under --workdir.
"""


@handle_errors
def command(
    workdir: Annotated[Path, typer.Option("--workdir", help="Where the demo writes its data, reports and purified adapter.")] = Path("bdscan-demo"),
    method: Annotated[str, typer.Option("--method", help="Purification method to demonstrate.")] = "kfac-lora",
    seed: Seed = 0,
    as_json: JsonOut = False,
    device: Device = "auto",
    dtype: Dtype = "auto",
) -> None:
    placement = placement_of(device, dtype)
    quiet_libraries()
    from rich.markup import escape
    from rich.table import Table

    from bdscan.demo import run_demo

    with progress_bar(not as_json) as progress:
        result = run_demo(workdir, method=method, seed=seed, progress=progress, placement=placement,
                          log=(lambda m: None) if as_json else log_line)

    def render(console) -> None:
        table = Table(title="bdscan demo: audit of a backdoored and a clean adapter")
        table.add_column("step")
        table.add_column("result")
        table.add_column("s", justify="right")
        for step in result.steps:
            table.add_row(escape(step.name), escape(step.outcome), f"{step.seconds:.0f}")
        console.print(table)
        for label, audit in result.audits.items():
            console.print(f"{label}: {audit['verdict']} (exit {audit['exit_code']}) · report {escape(audit.get('html', ''))}",
                          highlight=False)

    emit(result.to_dict(), as_json=as_json, output=None, render=render)

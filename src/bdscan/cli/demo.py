"""``bdscan demo``: the built-in example, end to end, with no flags needed."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from bdscan.cli.common import JsonOut, Seed, emit, handle_errors, progress_bar, quiet_libraries, stderr

HELP = """Run the built-in example end to end: detect -> localize -> purify -> eval.

Builds (or reuses from the cache, ~/.cache/bdscan or $BDSCAN_CACHE) a tiny Llama trained from scratch on bdscan's own synthetic instructions, a backdoored LoRA adapter on it and a clean control adapter. It then scans both, localizes the backdoor from detect's candidate keys (never told the trigger), purifies the adapter and measures ASR before and after. Data files, reports and the purified adapter go to --workdir.
"""


@handle_errors
def command(
    workdir: Annotated[Path, typer.Option("--workdir", help="Where the demo writes its data, reports and purified adapter.")] = Path("bdscan-demo"),
    method: Annotated[str, typer.Option("--method", help="Purification method to demonstrate.")] = "kfac-lora",
    seed: Seed = 0,
    as_json: JsonOut = False,
) -> None:
    quiet_libraries()
    from rich.table import Table

    from bdscan.demo import run_demo

    with progress_bar(not as_json) as progress:
        result = run_demo(workdir, method=method, seed=seed, progress=progress,
                          log=(lambda m: None) if as_json else (lambda m: stderr.print(f"[dim]{m}[/]")))

    def render(console) -> None:
        table = Table(title="bdscan demo: detect → localize → purify → eval")
        table.add_column("step")
        table.add_column("result")
        table.add_column("s", justify="right")
        for step in result.steps:
            table.add_row(step.name, step.outcome, f"{step.seconds:.0f}")
        console.print(table)
        console.print(f"purified adapter: {result.purified_output}  (reports in {result.workdir})")

    emit(result.to_dict(), as_json=as_json, output=None, render=render)

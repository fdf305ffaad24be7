"""Console rendering of purification results."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from bdscan.report.eval import render_comparison
from bdscan.results.eval import EvalComparison
from bdscan.results.purify import PurifyResult


def render_purify(result: PurifyResult, console: Console) -> None:
    console.print(f"[bold]bdscan purify[/] {result.source} ({result.kind}) with [bold]{result.method}[/] "
                  f"in {result.seconds:.1f}s → {result.output}")
    console.print(f"modules changed: {len(result.modules_changed)}"
                  + (f" ({', '.join(result.modules_changed[:6])}{', ...' if len(result.modules_changed) > 6 else ''})" if result.modules_changed else ""))
    if result.before is not None and result.after is not None:
        render_comparison(EvalComparison(result.before, result.after), console)


def render_methods(methods, console: Console | None) -> None:
    """The method catalog (``purify.catalog.METHODS``) as a table."""
    table = Table(title="bdscan purify methods")
    table.add_column("method")
    table.add_column("threat models")
    table.add_column("what it does")
    for info in sorted(methods, key=lambda m: m.name):
        table.add_row(info.name, ", ".join(info.threat_models), info.summary)
    (console or Console()).print(table)

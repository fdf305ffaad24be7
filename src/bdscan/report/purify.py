"""Console rendering of purification results."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from bdscan.report.eval import render_comparison
from bdscan.results.eval import EvalComparison
from bdscan.results.purify import PurifyResult, TargetCheck, TargetReach


def render_purify(result: PurifyResult, console: Console) -> None:
    console.print(f"[bold]bdscan purify[/] {escape(result.source)} ({result.kind}) with [bold]{escape(result.method)}[/] "
                  f"in {result.seconds:.1f}s → {escape(str(result.output))}")
    console.print(f"modules changed: {len(result.modules_changed)}"
                  + (f" ({escape(', '.join(result.modules_changed[:6]))}{', ...' if len(result.modules_changed) > 6 else ''})" if result.modules_changed else ""))
    if result.before is not None and result.after is not None:
        render_comparison(EvalComparison(result.before, result.after), console)
    if result.target_check is not None:
        render_target_check(result.target_check, console)


def _after(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def target_line(t: TargetReach) -> str:
    """One target, plain text: Q and forced probability before -> after, and what that means."""
    verdict = {True: "target still reachable", False: "no longer reachable", None: "after not measured"}[t.still_reachable]
    return (f"target {t.text[:60]!r}: Q {t.q_before:.2f} -> {_after(t.q_after)}, forced {t.forced_before:.2f} -> "
            f"{_after(t.forced_after)} (weakest {t.forced_min_before:.2f} -> {_after(t.forced_min_after)}): {verdict}")


def render_target_check(check: TargetCheck, console: Console) -> None:
    if check.status == "skipped":
        console.print(f"[dim]target check skipped: {escape(check.error or '')}[/]")
    if check.status == "failed":
        console.print(f"[red]target check failed: {escape(check.error or '')}[/]")
    for t in check.targets:
        style = "bold red" if t.still_reachable else "green" if t.still_reachable is False else "dim"
        console.print(f"[{style}]{escape(target_line(t))}[/]", highlight=False)


def render_methods(methods, console: Console | None) -> None:
    """The method catalog (``purify.catalog.METHODS``) as a table."""
    table = Table(title="bdscan purify methods")
    table.add_column("method")
    table.add_column("threat models")
    table.add_column("what it does")
    for info in sorted(methods, key=lambda m: m.name):
        table.add_row(info.name, ", ".join(info.threat_models), info.summary)
    (console or Console()).print(table)

"""Console rendering of an audit: the verdict, the stage table and where the artefacts are."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from bdscan.results.audit import AuditResult

_STYLE = {"clean": "bold green", "repaired": "bold cyan", "suspicious": "bold red", "error": "bold red",
          "incomplete": "bold yellow"}
_STATUS = {"ok": "green", "failed": "red", "skipped": "dim"}


def render_audit(result: AuditResult, console: Console) -> None:
    table = Table(title=f"bdscan audit: {escape(result.model.source)} ({result.model.kind})")
    table.add_column("stage")
    table.add_column("status")
    table.add_column("s", justify="right")
    table.add_column("result")
    for s in result.stages:
        table.add_row(s.name, f"[{_STATUS.get(s.status, '')}]{s.status}[/]", f"{s.seconds:.0f}", escape(s.summary))
    console.print(table)
    console.print(f"[{_STYLE.get(result.verdict, 'bold')}]{result.verdict.upper()}[/]  exit code {result.exit_code}"
                  + (f" · key {escape(repr(result.key))}" if result.key is not None else ""), highlight=False)
    for name, path in result.outputs.items():
        console.print(f"[dim]{name}:[/] {escape(path)}", highlight=False)

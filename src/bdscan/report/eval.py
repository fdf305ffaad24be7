"""Console rendering of evaluation results."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from bdscan.results.eval import EvalComparison, EvalResult


def pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


def num(x: float | None, fmt: str = "{:.3f}") -> str:
    return "—" if x is None else fmt.format(x)


def _rows(result: EvalResult) -> list[tuple[str, str]]:
    rows = [("ASR (all triggered)", pct(result.asr))]
    rows += [(f"  ASR @ {name}", pct(v)) for name, v in result.asr_by_position.items()]
    rows += [
        ("false-trigger rate (clean)", pct(result.false_trigger_rate)),
        ("perplexity (clean refs)", num(result.perplexity, "{:.2f}")),
        ("agreement with reference", pct(result.agreement)),
        ("  token F1 with reference", num(result.token_agreement, "{:.2f}")),
        ("  next-token agreement (teacher-forced)", num(result.next_token_agreement, "{:.2f}")),
        ("prompts (triggered / clean)", f"{result.n_poison} / {result.n_clean}"),
    ]
    return rows


def render_eval(result: EvalResult, console: Console) -> None:
    table = Table(title=f"bdscan eval: {escape(result.source)}",
                  caption=f"judge {escape(str(result.judge))} · template {escape(str(result.template['name']))} · {result.seconds:.1f}s")
    table.add_column("measure")
    table.add_column("value", justify="right")
    for name, value in _rows(result):
        table.add_row(escape(name), value)
    console.print(table)
    for name, samples in result.samples.items():
        for s in samples[:1]:
            console.print(f"[dim]{escape(name)}:[/] {escape(repr(s.prompt[:60]))} → {escape(repr(s.response[:70]))} "
                          f"[{'red' if s.hit else 'green'}]{'HIT' if s.hit else 'ok'}[/]", highlight=False)
    render_skipped(result, console)


def render_skipped(result: EvalResult, console: Console, shown: int = 5) -> None:
    """The prompts not scored, and why (the JSON lists every one)."""
    for issue in result.skipped[:shown]:
        console.print(f"skipped {issue.what}: {issue.reason}", style="yellow", markup=False, highlight=False)
    if len(result.skipped) > shown:
        console.print(f"... and {len(result.skipped) - shown} more skipped (see the JSON report)", style="yellow")


def render_comparison(comparison: EvalComparison, console: Console) -> None:
    before, after = comparison.before, comparison.after
    table = Table(title="bdscan eval: before / after", caption=f"judge {escape(str(before.judge))} · template {escape(str(before.template['name']))}")
    table.add_column("measure")
    table.add_column(escape(before.source), justify="right")
    table.add_column(escape(after.source), justify="right")
    for (name, a), (_, b) in zip(_rows(before), _rows(after)):
        table.add_row(escape(name), a, b)
    console.print(table)
    render_skipped(before, console)
    render_skipped(after, console)

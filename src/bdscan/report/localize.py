"""Console rendering of localization results."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from bdscan.results.localize import LocalizeResult


def render_localize(result: LocalizeResult, console: Console, *, top: int | None = None) -> None:
    k = top or result.top_k
    src = result.trigger_source
    how = f"key {escape(repr(src.get('key')))} ({'given' if src.get('kind') == 'trigger' else 'best of detect candidates'})"
    t = result.timing
    ratio = f" · K-FAC {t.get('kfac_cost_ratio')}x one fwd+bwd" if t.get("kfac_cost_ratio") else ""
    table = Table(title=f"bdscan localize: {escape(result.source)} ({result.kind})",
                  caption=f"{how} · gap {result.gap:.2f} nats over {result.n_pairs} pairs · "
                          f"{result.curvature_method} on {result.curvature_target} · {t.get('total_s', 0):.1f}s{ratio}")
    table.add_column("#", justify="right")
    table.add_column("module")
    table.add_column("kind")
    table.add_column("patching", justify="right")
    table.add_column("curvature", justify="right")
    table.add_column("score", justify="right")
    for i, m in enumerate(result.modules[:k], 1):
        table.add_row(str(i), escape(m.name), m.kind, f"{100 * m.patching_effect:.1f}%", f"{m.curvature:.3g}", f"{m.score:.3f}")
    console.print(table)
    heads = sorted((s for s in result.sites if s.kind == "head"), key=lambda s: -s.effect)[:3]
    blocks = sorted((s for s in result.sites if s.kind in ("attn", "mlp")), key=lambda s: -s.effect)[:3]
    if blocks:
        console.print("strongest blocks: " + ", ".join(f"{escape(s.name)} {100 * s.effect:.0f}%" for s in blocks))
    if heads:
        console.print("strongest heads: " + ", ".join(f"L{s.layer}.H{s.head} {100 * s.effect:.0f}%" for s in heads))
    for w in result.warnings:
        console.print(f"[yellow]warning:[/] {escape(w)}")

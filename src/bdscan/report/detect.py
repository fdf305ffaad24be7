"""Console rendering of a detect result: verdict, per-layer x per-head table, top keys, skips.

Every text that comes from the model or its files (keys, targets, the source, reasons) is
escaped: rich reads brackets as markup, and a token such as "[/INST]" in a recovered key
raised a MarkupError mid-report."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from bdscan.results.detect import DetectResult

_VERDICT_STYLE = {"clean": "bold green", "suspicious": "bold red"}


def _z_style(z: float) -> str:
    return "red" if z >= 4 else "yellow" if z >= 2 else ""


def _head_table(result: DetectResult) -> Table | None:
    if not result.heads:
        return None
    n_heads = max(h.head for h in result.heads) + 1
    table = Table(title="head-similarity rise over clean probes (z vs control tokens; best candidate per cell)",
                  caption="cell: z (rise of the head's mean cosine similarity to the other heads)")
    table.add_column("layer", justify="right")
    table.add_column("clean C_l", justify="right")
    table.add_column("layer z", justify="right")
    for h in range(n_heads):
        table.add_column(f"h{h}", justify="right")
    by_layer: dict[int, list] = {}
    for h in result.heads:
        by_layer.setdefault(h.layer, []).append(h)
    for layer in result.layers:
        cells = [f"[{_z_style(h.z)}]{h.z:+.1f}[/] ({h.rise:+.3f})" if _z_style(h.z) else f"{h.z:+.1f} ({h.rise:+.3f})"
                 for h in sorted(by_layer.get(layer.layer, []), key=lambda h: h.head)]
        table.add_row(str(layer.layer), f"{layer.clean_similarity:.3f}", f"{layer.z:+.1f}", *cells)
    return table


def _candidate_table(result: DetectResult, top: int) -> Table:
    table = Table(title=f"top candidate keys (of {len(result.candidates)} scanned; z vs {result.controls.n if result.controls else 0} random control tokens)")
    table.add_column("#", justify="right")
    table.add_column("key")
    table.add_column("score", justify="right")
    table.add_column("agree z (share)", justify="right")
    table.add_column("collapse z", justify="right")
    table.add_column("KL nats", justify="right")
    table.add_column("KL by position", justify="right")
    table.add_column("attn z (layer)", justify="right")
    for i, c in enumerate(result.candidates[:top], 1):
        pos = "/".join(f"{v:.2f}" for v in c.effect_by_position.values())
        layer = "" if c.attention_layer is None else f" (L{c.attention_layer})"
        table.add_row(str(i), escape(repr(c.text)), f"{c.score:.1f}", f"{c.consistency_z:.1f} ({c.consistency:+.2f})", f"{c.collapse_z:.1f}", f"{c.output_effect:.2f}",
                      pos, f"{c.attention_z:+.1f}{layer}")
    return table


def _target_table(result: DetectResult, top: int) -> Table:
    table = Table(title="inverted targets (first token + greedy extension on the probe-averaged distribution; "
                        "no trigger given)",
                  caption="evidence = weakest opening token x (paired firing lift with key - without, less 2 standard errors); a memorised phrase has high Q but no key that fires")
    for col in ("#", "target", "Q", "weakest", "tokens", "recovered key (position)", "fires", "without key", "evidence"):
        table.add_column(col, justify="left" if col in ("target", "recovered key (position)") else "right")
    for i, t in enumerate(result.targets[:top], 1):
        key = escape(f"{t.key!r} ({t.key_position})") if t.key is not None else "—"
        fires = "" if t.firing_rate is None else f"{t.firing_rate:.2f}"
        without = "" if t.clean_firing_rate is None else f"{t.clean_firing_rate:.2f}"
        text = t.text if len(t.text) <= 60 else t.text[:57] + "..."
        variants = f" (+{len(t.variants)} variant{'s' if len(t.variants) > 1 else ''})" if t.variants else ""
        table.add_row(str(i), escape(repr(text)) + variants, f"{t.q:.3f}", f"{t.opening_min:.2f}", str(t.length), key, fires, without, f"{t.evidence:.3f}")
    return table


def _summary_lines(result: DetectResult, console: Console) -> None:
    s = result.summary
    style = _VERDICT_STYLE.get(s.verdict, "bold")
    console.print(f"[{style}]{s.verdict.upper()}[/]  {escape(result.source)} ({result.kind})  "
                  f"probability {s.probability:.2f}  severity {s.severity}", highlight=False)
    if s.target is not None:
        fire = "not measured" if s.key_firing_rate is None else \
            f"fires on {s.key_firing_rate:.2f} of held-out probes ({s.clean_firing_rate:.2f} without it)"
        console.print(f"target evidence {s.target_score:.3f} (p {s.target_probability:.2f}): inverted target "
                      f"{escape(repr(s.target[:80]))} Q {s.target_q:.3f}; recovered key {escape(repr(s.recovered_key))} at {s.key_position}, "
                      f"{fire}", highlight=False)
    console.print(f"takeover score {s.score:.2f} (p {s.takeover_probability or 0.0:.2f}): agreement z {s.output_score:.2f}"
                  f" · attention (head-similarity) z {s.attention_score:.2f} · top key {escape(repr(s.top_candidate))}", highlight=False)


def _calibration_line(result: DetectResult, console: Console) -> None:
    """Which thresholds read the verdict, and a warning when a profile is from another vocabulary."""
    cal = result.calibration
    if "profile" not in cal:
        return
    console.print(f"[dim]calibration: {escape(str(cal['profile']))} (takeover threshold {cal.get('threshold', 0):.2f}, "
                  f"target threshold {cal.get('target_threshold', 0):.3f})[/]", highlight=False)
    if cal.get("profile_vocab_matches") is False:
        console.print("[yellow]warning[/] the calibration profile was read from models of another vocabulary: "
                      "its thresholds may not hold for this model", highlight=False)


def render_detect(result: DetectResult, console: Console, *, top: int = 10) -> None:
    _summary_lines(result, console)
    if result.targets:
        console.print(_target_table(result, 5))
    heads = _head_table(result)
    if heads is not None:
        console.print(heads)
    if result.candidates:
        console.print(_candidate_table(result, top))
    if result.controls:
        c = result.controls
        console.print(f"[dim]controls: {c.n} random tokens, KL median {c.output_effect_median:.3f} max {c.output_effect_max:.3f} nats; "
                      f"collapse {c.collapse_mean:+.3f} ± {c.collapse_std:.3f}; agreement {c.consistency_mean:+.2f} ± {c.consistency_std:.2f}[/]")
    for issue in result.skipped:
        console.print(f"[yellow]skipped[/] {escape(issue.what)}: {escape(issue.reason)}", highlight=False)
    for issue in result.errors:
        console.print(f"[red]error[/] {escape(issue.what)}: {escape(issue.reason)}", highlight=False)
    _calibration_line(result, console)
    t = result.timings
    console.print(f"[dim]template {escape(str(result.template.get('name')))} · {result.stats.get('screened_keys', 0)} keys screened "
                  f"({result.stats.get('vocabulary_tokens', 0)} vocabulary tokens), "
                  f"{result.stats.get('scan_prompts', 0)} scan prompts · {t.get('total', 0):.1f}s[/]")

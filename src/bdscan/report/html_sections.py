"""HTML sections for each stage's typed result (detect, localize, eval), shared by the audit
report and by ``bdscan detect/eval -o x.html``."""

from __future__ import annotations

import math
from typing import Sequence

from bdscan.report.figures import AFTER, BEFORE, NEUTRAL, Series, bars, esc, heatmap
from bdscan.report.html_parts import Raw, code, facts, note, num, pct, table
from bdscan.results.detect import DetectResult
from bdscan.results.eval import EvalResult
from bdscan.results.extras import detect_extras
from bdscan.results.localize import LocalizeResult
from bdscan.results.purify import PurifyResult

TOP_CANDIDATES = 10
TOP_MODULES = 8


def head_heatmap(result: DetectResult) -> str:
    if not result.heads:
        return note("No per-head attention scores (the model returned no attention rows).")
    layers = sorted({h.layer for h in result.heads})
    n_heads = max(h.head for h in result.heads) + 1
    grid: dict[int, list[float | None]] = {layer: [None] * n_heads for layer in layers}
    for h in result.heads:
        grid[h.layer][h.head] = h.z
    return heatmap([grid[layer] for layer in layers], [f"layer {layer}" for layer in layers],
                   [f"h{i}" for i in range(n_heads)], figure_id="attention-heatmap",
                   title="Attention-head similarity rise, per layer × head",
                   caption="z of each head's rise in similarity to the other heads when the best candidate key is "
                           "inserted, against random control tokens (red: heads converge, as a backdoor key makes them).")


def candidate_chart(result: DetectResult) -> str:
    top = result.candidates[:TOP_CANDIDATES]
    if not top:
        return note("Detect scanned no candidate keys.")
    threshold = result.calibration.get("threshold")
    line = (float(threshold), f"threshold {threshold}") if isinstance(threshold, (int, float)) else None
    n = result.controls.n if result.controls else 0
    return bars([repr(c.text) for c in top], [Series("score", [c.score for c in top], NEUTRAL)],
                figure_id="candidates", title=f"Top candidate keys: score vs {n} random control tokens",
                caption="Score: takeover z (share of prompts the key switches to one same continuation) plus a bounded "
                        "attention term, standardised against control tokens; the grey band is the controls' spread "
                        "(±2 sd), the dashed line the verdict threshold.",
                band=(-2.0, 2.0, "control tokens: ±2 sd"), line=line, fmt="{:.1f}")


def _extra_value(name: str, value: object) -> object:
    """Strings as quoted code (keys and targets may hold whitespace or markup), rates as %,
    anything structured (a later detect may nest these) as compact JSON."""
    import json

    from bdscan.results.base import to_plain

    if isinstance(value, str):
        return code(repr(value))
    if isinstance(value, float):
        return pct(value) if name == "firing_rate" else f"{value:.3g}"
    return code(json.dumps(to_plain(value), default=str))


def _extras_box(result: DetectResult) -> str:
    extras = detect_extras(result)
    if not extras:
        return ""
    labels = {"recovered_key": "recovered key", "inverted_target": "inverted target", "target_q": "Q",
              "firing_rate": "firing rate"}
    rows = [(labels[k], _extra_value(k, v)) for k, v in extras.items()]
    return f'<div class="keybox" data-figure="recovered">{facts(rows)}</div>'


def _candidate_table(result: DetectResult) -> str:
    rows = [(i, code(repr(c.text)), c.source, f"{c.score:.1f}", f"{c.consistency:+.2f} (z {c.consistency_z:.1f})",
             f"{c.output_effect:.2f}", f"{c.attention_z:+.1f}")
            for i, c in enumerate(result.candidates[:TOP_CANDIDATES], 1)]
    return table(["#", "key", "from", "score", "takeover", "KL nats", "attention z"], rows, numeric=(0, 3, 4, 5, 6))


def detect_body(result: DetectResult) -> list[str]:
    s = result.summary
    parts = [facts([("verdict", Raw(f'<span class="verdict v-{esc(s.verdict)}">{esc(s.verdict.upper())}</span>')),
                    ("score", f"{s.score:.2f} (threshold {result.calibration.get('threshold', 'n/a')})"),
                    ("probability", f"{s.probability:.2f}"), ("severity", s.severity),
                    ("output signal (takeover z)", f"{s.output_score:.2f}"),
                    ("attention signal (head z)", f"{s.attention_score:.2f}"),
                    ("top key", code(repr(s.top_candidate)))])]
    parts += [_extras_box(result), candidate_chart(result), _candidate_table(result), head_heatmap(result)]
    if result.controls:
        c = result.controls
        parts.append(note(f"Controls: {c.n} random tokens; KL median {c.output_effect_median:.3f}, max "
                          f"{c.output_effect_max:.3f} nats; takeover {c.consistency_mean:+.2f} ± {c.consistency_std:.2f}."))
    issues = [("skipped", i.what, i.reason) for i in result.skipped] + [("error", i.what, i.reason) for i in result.errors]
    if issues:
        parts.append(table(["", "what", "why"], issues))
    return parts


def localize_chart(result: LocalizeResult) -> str:
    top = result.modules[:TOP_MODULES]
    if not top:
        return note("Localize ranked no modules.")
    peak = max((m.curvature for m in top if math.isfinite(m.curvature)), default=0.0) or 1.0
    return bars([m.name for m in top], [Series("patching effect", [m.patching_effect for m in top], BEFORE),
                                        Series("curvature (÷ max)", [m.curvature / peak for m in top], NEUTRAL)],
                figure_id="localize", title="Modules carrying the backdoor, ranked",
                caption="Patching effect: share of the clean-vs-triggered gap removed by restoring the module's "
                        "block; curvature: Fisher norm on the malicious continuation, relative to the largest shown.",
                hi=1.0, fmt="{:.2f}")


def localize_body(result: LocalizeResult) -> list[str]:
    src = result.trigger_source
    parts = [facts([("key", code(repr(src.get("key")))),
                    ("chosen from", ", ".join(repr(c.get("text")) for c in src.get("candidates", []) if isinstance(c, dict))
                     or "the given key"),
                    ("gap", f"{result.gap:.2f} nats over {result.n_pairs} pairs"),
                    ("curvature", f"{result.curvature_method} on {result.curvature_target}")]),
             localize_chart(result)]
    parts.append(table(["#", "module", "kind", "patching", "curvature", "score"],
                       [(i, code(m.name), m.kind, pct(m.patching_effect), f"{m.curvature:.3g}", f"{m.score:.3f}")
                        for i, m in enumerate(result.modules[:TOP_MODULES], 1)], numeric=(0, 3, 4, 5)))
    parts += [note(f"warning: {w}", "fail") for w in result.warnings]
    return parts


def _pair(results: Sequence[EvalResult | None]) -> list[Series]:
    names, colors = (("before", "after"), (BEFORE, AFTER)) if len(results) == 2 else (("model",), (BEFORE,))
    return [Series(n, [], c) for n, c in zip(names, colors)]


def asr_chart(results: Sequence[EvalResult | None]) -> str:
    known = [r for r in results if r is not None]
    if not known:
        return note("ASR was not measured.")
    positions = list(dict.fromkeys(p for r in known for p in r.asr_by_position))
    series = [Series(s.name, [r.asr_by_position.get(p) if r else None for p in positions] + [r.asr if r else None],
                     s.color) for s, r in zip(_pair(results), results)]
    return bars([f"key at {p}" for p in positions] + ["all positions"], series, figure_id="asr",
                title="Attack success rate by trigger position", hi=1.0, fmt="{:.2f}",
                caption="Share of clean prompts, with the key inserted at each position, whose response the judge "
                        "counts as the backdoor's behaviour.")


def utility_chart(results: Sequence[EvalResult | None]) -> str:
    known = [r for r in results if r is not None]
    if not known:
        return note("Utility was not measured.")
    series = [Series(s.name, [r.false_trigger_rate, r.agreement, r.next_token_agreement] if r else [None] * 3,
                     s.color) for s, r in zip(_pair(results), results)]
    return bars(["false-trigger rate (clean)", "agreement (clean answers)", "next-token agreement"], series,
                figure_id="utility", title="False triggers and utility", hi=1.0, fmt="{:.2f}",
                caption="False-trigger rate: clean prompts (no key) judged as the backdoor's behaviour. Agreement: "
                        "greedy clean responses identical to the suspicious model's. Next-token agreement: share of "
                        "the suspicious model's answer tokens predicted top-1, teacher-forced on that answer (n/a "
                        "for the model itself).")


def eval_table(results: Sequence[EvalResult | None], names: Sequence[str]) -> str:
    rows = [("ASR (all triggered)", *(pct(r.asr) if r else "n/a" for r in results)),
            ("false-trigger rate", *(pct(r.false_trigger_rate) if r else "n/a" for r in results)),
            ("perplexity of clean references", *(num(r.perplexity) if r else "n/a" for r in results)),
            ("agreement", *(pct(r.agreement) if r else "n/a" for r in results)),
            ("token F1 with the suspicious model", *(num(r.token_agreement) if r else "n/a" for r in results)),
            ("next-token agreement", *(num(r.next_token_agreement) if r else "n/a" for r in results)),
            ("prompts (triggered / clean)", *(f"{r.n_poison} / {r.n_clean}" if r else "n/a" for r in results))]
    return table(["measure", *names], rows, numeric=tuple(range(1, len(names) + 1)))


def samples_table(result: EvalResult | None, label: str) -> str:
    if result is None or not result.samples:
        return ""
    rows = [(f"{label}: {name}", s.prompt, s.response, "HIT" if s.hit else "ok")
            for name, samples in result.samples.items() for s in samples[:2]]
    return "<h3>Example responses (" + esc(label) + ")</h3>" + table(["set", "prompt", "response", "judge"], rows)


def eval_body(results: Sequence[EvalResult | None], names: Sequence[str]) -> list[str]:
    first = next((r for r in results if r is not None), None)
    head = [note(f"judge {first.judge} · template {first.template.get('name')}")] if first else []
    return head + [asr_chart(results), utility_chart(results), eval_table(results, names)]



def _reachable_cell(reachable: bool | None) -> object:
    if reachable:
        return Raw('<span class="st-failed">still reachable</span>')
    return "no" if reachable is False else "n/a"


def target_check_body(result: PurifyResult | None) -> list[str]:
    """Detect's targets before and after the repair (purify's target check), when it ran."""
    check = result.target_check if result is not None else None
    if check is None or (check.status == "skipped" and not check.targets):
        return []
    rows = [(code(repr(t.text[:80])), num(t.q_before), num(t.q_after), num(t.forced_before), num(t.forced_after),
             num(t.forced_min_before), num(t.forced_min_after), _reachable_cell(t.still_reachable))
            for t in check.targets]
    head = [note(f"target check {check.status}: {check.error}", "fail")] if check.error else []
    return head + ["<h3>Detect's targets before and after</h3>",
                   note(f"Q: detect's greedy extension of the target's first token; forced: mean probability of the "
                        f"target's own tokens, over {check.probes} clean probes; weakest: the least of them over its "
                        f"opening. Still reachable: weakest after >= {check.reachable_prob:.2f} (detect's target threshold)."),
                   table(["target", "Q before", "Q after", "forced before", "forced after", "weakest before",
                          "weakest after", "still reachable"], rows, numeric=(1, 2, 3, 4, 5, 6))]

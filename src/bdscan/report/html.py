"""Self-contained HTML reports: one file, inline CSS and SVG, no script, no network.

``render_audit_html`` renders an ``AuditResult`` (the audit's report.html, and ``bdscan
report audit.json``); ``render_detect_html`` and ``render_eval_html`` serve ``-o x.html``
of those commands. All text from the model and its files is escaped.
"""

from __future__ import annotations

from bdscan.report.figures import esc
from bdscan.report.html_parts import Raw, code, facts, note, page, section, table
from bdscan.report.html_sections import detect_body, eval_body, localize_body, samples_table, target_check_body
from bdscan.results.audit import AuditResult, StageRecord
from bdscan.results.detect import DetectResult
from bdscan.results.eval import EvalComparison, EvalResult


def _verdict_badge(verdict: str) -> Raw:
    return Raw(f'<span class="verdict v-{esc(verdict)}" data-verdict="{esc(verdict)}">{esc(verdict.upper())}</span>')


def _lead(result: AuditResult) -> str:
    s, after = result.settings, result.eval_after
    if result.verdict == "clean":
        found = result.detect.summary if result.detect is not None else None
        if found is not None and found.verdict == "suspicious":
            return (f"Detect's verdict is suspicious at severity {found.severity}, below --fail-on {s.get('fail_on')}: "
                    "treated as clean; nothing was repaired.")
        return f"No backdoor found at --fail-on {s.get('fail_on')}; nothing was repaired."
    if result.verdict == "incomplete":
        return "Detect found no backdoor, but parts of the scan were skipped: this is not a pass."
    if result.verdict == "error":
        return "Detect failed: the model could not be judged."
    if result.verdict == "repaired":
        return (f"Backdoor suspected and repaired with {s.get('method')}: residual ASR {after.asr:.3f} and "
                f"false-trigger rate {after.false_trigger_rate:.3f}, both at or under {s.get('max_asr')}.")
    if not s.get("purify", True):
        return "Backdoor suspected; not repaired (--no-purify)."
    before, floor = result.eval_before, s.get("min_asr_before")
    if before is not None and before.asr is not None and isinstance(floor, (int, float)) and before.asr < floor:
        return (f"Backdoor suspected, but with the key {result.key!r} the judge {s.get('judge')} saw ASR {before.asr:.2f} "
                f"before the repair (under {floor}): a repair cannot be shown. Pass --judge matching the "
                "backdoor's behaviour, or the key is only part of the trigger.")
    if after is None:
        return "Backdoor suspected; the repair did not complete (see the stages below)."
    reachable = result.purify.target_check.reachable if result.purify and result.purify.target_check else []
    if reachable and after.asr is not None and after.asr <= s.get("max_asr", 0.0):
        return (f"Backdoor suspected; {s.get('method')} brought the key's ASR to {after.asr:.3f}, but the purified "
                f"model still continues detect's target {reachable[0].text[:60]!r} from its first token: not repaired.")
    return (f"Backdoor suspected; {s.get('method')} left ASR {after.asr if after.asr is not None else 'n/a'} / "
            f"false-trigger {after.false_trigger_rate:.3f}, above the target {s.get('max_asr')}.")


def _sha_list(hashes: dict[str, str]) -> Raw:
    return Raw("<br>".join(f"{esc(name)}: <code>{esc(h)}</code>" for name, h in hashes.items()) or "n/a")


def header(result: AuditResult) -> str:
    m = result.model
    rows = [("source", code(m.source)), ("revision", m.revision or "local folder"),
            ("kind", "LoRA adapter" if m.kind == "adapter" else "full checkpoint"), ("weights sha256", _sha_list(m.weights_sha256))]
    if m.base:
        rows += [("base", code(m.base)), ("base revision", m.base_revision or "local folder"),
                 ("base weights sha256", _sha_list(m.base_weights_sha256))]
    rows += [("key used", code(repr(result.key)) if result.key is not None else "none"),
             ("bdscan", result.version), ("seed", result.seed), ("exit code", result.exit_code)]
    return (f'<header class="top" id="summary"><h1>bdscan audit</h1>{_verdict_badge(result.verdict)}'
            f'<p class="lead">{esc(_lead(result))}</p>{facts(rows)}</header>')


def _stage_rows(stages: list[StageRecord]):
    for s in stages:
        yield (s.name, Raw(f'<span class="st-{esc(s.status)}">{esc(s.status)}</span>'), f"{s.seconds:.1f}", s.summary)


def _stage_note(result: AuditResult, name: str) -> list[str]:
    stage = result.stage(name)
    if stage is None:
        return [note("not run")]
    return [note(f"{stage.status}: {stage.summary}", "fail" if stage.status == "failed" else "note")]


def _stage_section(result: AuditResult, section_id: str, title: str, names: tuple[str, ...], body) -> str:
    """A stage's section: its content when it produced a result, else why it has none."""
    if body is None:
        return section(section_id, title, [p for n in names for p in _stage_note(result, n)])
    failed = [p for n in names if (s := result.stage(n)) is not None and s.status == "failed" for p in _stage_note(result, n)]
    return section(section_id, title, failed + body)


def _eval_set_note(result: AuditResult) -> str:
    s = result.settings
    if s.get("eval_held_out"):
        return note(f"Measured on held-out clean prompts ({s.get('eval_clean')}), with the key {result.key!r} inserted "
                    "at the start, middle and end of each.")
    return note(f"Measured on the --clean set ({s.get('clean')}), which the repair also learned from: the after numbers "
                "are optimistic; pass --eval-clean with held-out prompts for unbiased ones.", "fail")


def _detect_after(result: AuditResult) -> list[str] | None:
    after, before = result.detect_after, result.detect
    if after is None:
        return None
    was = f"{before.summary.score:.2f} → " if before is not None else ""
    return [facts([("verdict", _verdict_badge(after.summary.verdict)), ("score", f"{was}{after.summary.score:.2f}"),
                   ("top key now", code(repr(after.summary.top_candidate)))])]


def _files(result: AuditResult) -> list[str] | None:
    if result.files is None:
        return None
    rows = [(f.root, code(f.path), f"{f.size:,}", Raw(f'<span class="mono">{esc(f.sha256)}</span>'),
             Raw(f'<span class="a-{esc(f.action)}">{esc(f.action)}</span>'), f.reason) for f in result.files.files]
    counts = ", ".join(f"{len(result.files.by_action(a))} {a}" for a in ("loaded", "refused", "ignored"))
    return [note(f"{len(result.files.files)} files: {counts}. Nothing was unpickled and no model code was run."),
            table(["", "file", "bytes", "sha256", "action", "why"], rows, numeric=(2,), classes={3: "sha"})]


def _issues(result: AuditResult) -> list[str]:
    rows = [("refused file", f"{f.root}/{f.path}", f.reason) for f in (result.files.by_action("refused") if result.files else [])]
    for found, where in ((result.detect, "detect"), (result.detect_after, "detect (purified)")):
        if found is not None:
            rows += [(f"{where}: skipped", i.what, i.reason) for i in found.skipped]
            rows += [(f"{where}: error", i.what, i.reason) for i in found.errors]
    rows += [("localize warning", "", w) for w in (result.localize.warnings if result.localize else [])]
    rows += [(f"stage {s.status}", s.name, s.error or s.summary) for s in result.stages if s.status != "ok"]
    return [table(["kind", "what", "why"], rows)] if rows else [note("Nothing was skipped or refused.")]


def _reproduce(result: AuditResult) -> list[str]:
    parts = [f"<h3>The whole audit</h3><pre>{esc(result.command)}</pre>"] if result.command else []
    for s in result.stages:
        if s.command:
            parts.append(f"<h3>{esc(s.name)}</h3><pre>{esc(s.command)}</pre>")
    return parts or [note("No commands recorded.")]


def render_audit_html(result: AuditResult) -> str:
    evals = [result.eval_before, result.eval_after]
    has_eval = any(e is not None for e in evals)
    body = [
        header(result),
        section("stages", "Stages", [table(["stage", "status", "s", "result"], _stage_rows(result.stages), numeric=(2,))]),
        _stage_section(result, "detect", "Detect: is there a backdoor?", ("detect",),
                       detect_body(result.detect) if result.detect is not None else None),
        _stage_section(result, "localize", "Localize: which modules carry it", ("localize",),
                       localize_body(result.localize) if result.localize is not None else None),
        _stage_section(result, "eval", "Evaluation before and after the repair", ("eval (before)", "purify", "eval (after)"),
                       [_eval_set_note(result)] + eval_body(evals, ["before", "after"])
                       + [samples_table(result.eval_after, "after")] + target_check_body(result.purify) if has_eval else None),
        _stage_section(result, "detect-after", "Detect on the purified model", ("detect (purified)",), _detect_after(result)),
        _stage_section(result, "files", "File safety", ("file safety",), _files(result)),
        section("issues", "Skipped and refused", _issues(result)),
        section("reproduce", "Reproduce each stage", _reproduce(result)),
        f"<footer>bdscan {esc(result.version)} · self-contained report: no scripts, no network requests</footer>",
    ]
    return page(f"bdscan audit: {result.verdict} — {result.model.source}", body)


def render_detect_html(result: DetectResult) -> str:
    head = (f'<header class="top" id="summary"><h1>bdscan detect</h1>{_verdict_badge(result.summary.verdict)}'
            + facts([("source", code(result.source)), ("kind", result.kind), ("base", result.base or "n/a"),
                     ("bdscan", result.version), ("seed", result.settings.get("seed"))]) + "</header>")
    return page(f"bdscan detect: {result.summary.verdict} — {result.source}",
                [head, section("detect", "Detect", detect_body(result))])


def render_eval_html(result: EvalResult | EvalComparison) -> str:
    pair = [result.before, result.after] if isinstance(result, EvalComparison) else [result]
    names = [r.source for r in pair]
    head = ('<header class="top" id="summary"><h1>bdscan eval</h1>'
            + facts([(f"model {i + 1}", code(n)) for i, n in enumerate(names)]) + "</header>")
    samples = [samples_table(r, n) for r, n in zip(pair, names)]
    return page(f"bdscan eval — {names[0]}", [head, section("eval", "Evaluation", eval_body(pair, names) + samples)])

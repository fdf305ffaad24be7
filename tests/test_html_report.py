"""The HTML reports from hand-built results: every section, empty and failed stages,
hostile text escaped, no external URL, and audit.json round-tripping with schema checks."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
from typer.testing import CliRunner

from audit_samples import HOSTILE, HOSTILE_KEY, audit_result, detect_result, eval_result, stages
from bdscan.cli.app import app
from bdscan.errors import InputError
from bdscan.report.html import render_audit_html, render_detect_html, render_eval_html
from bdscan.results.audit import AuditResult
from bdscan.results.eval import EvalComparison

FIGURES = ("attention-heatmap", "candidates", "localize", "asr", "utility")
SECTIONS = ("summary", "stages", "detect", "localize", "eval", "detect-after", "files", "issues", "reproduce")
EXTERNAL = re.compile(r"""(?:src|href|action|xlink:href)\s*=\s*["']?\s*(?:https?:)?//""", re.IGNORECASE)


def assert_safe(page: str) -> None:
    """No live markup from the hostile strings, no script at all, nothing fetched from outside."""
    assert "<script" not in page.lower()
    assert "<img" not in page.lower()
    assert not EXTERNAL.search(page), EXTERNAL.search(page)
    assert "url(" not in page and "@import" not in page


def test_full_audit_renders_every_section_and_figure():
    page = render_audit_html(audit_result())
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    for section_id in SECTIONS:
        assert f'id="{section_id}"' in page
    for figure in FIGURES:
        assert f'data-figure="{figure}"' in page
    assert 'data-verdict="repaired"' in page and "REPAIRED" in page
    assert "sha256" in page and "ab" * 32 in page and "a" * 40 in page  # header: weights hash and revision
    assert "bdscan localize org/suspect" in page  # reproduction commands
    assert "refused" in page and "modeling_x.py" in page
    assert "@media (max-width" in page and "@media print" in page
    assert_safe(page)


def test_hostile_text_is_escaped_everywhere():
    page = render_audit_html(audit_result())
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page
    # the key, a file name, a response, an error message and a localize warning all carry it
    assert page.count("&lt;script&gt;") >= 8
    assert_safe(page)


def test_clean_audit_shows_why_later_stages_did_not_run():
    skipped = {name: "skipped" for name in ("localize", "eval (before)", "purify", "eval (after)", "detect (purified)")}
    result = audit_result(verdict="clean", exit_code=0, stages=stages(skipped), detect=detect_result("clean"),
                          localize=None, eval_before=None, purify=None, eval_after=None, detect_after=None, key=None)
    page = render_audit_html(result)
    assert 'data-verdict="clean"' in page and "nothing was repaired" in page
    assert 'data-figure="attention-heatmap"' in page and 'data-figure="localize"' not in page
    assert page.count("skipped:") >= 4
    assert_safe(page)


def test_failed_and_empty_stages_render():
    failed = stages({"detect": "failed", "localize": "skipped", "eval (before)": "skipped", "purify": "skipped",
                     "eval (after)": "skipped", "detect (purified)": "skipped", "file safety": "failed"})
    result = audit_result(verdict="error", exit_code=2, stages=failed, detect=None, localize=None, eval_before=None,
                          purify=None, eval_after=None, detect_after=None, files=None, key=None)
    page = render_audit_html(result)
    assert "Detect failed" in page and 'class="fail"' in page
    assert "RuntimeError: boom &lt;script&gt;" in page
    assert_safe(page)
    empty = audit_result(detect=detect_result(candidates=False, heads=False),
                         localize=dataclasses.replace(audit_result().localize, modules=[], warnings=[]))
    page = render_audit_html(empty)
    assert "scanned no candidate keys" in page and "No per-head attention scores" in page
    assert "ranked no modules" in page
    assert_safe(page)


def test_detect_v2_fields_render_when_present():
    found = detect_result()
    v2 = type("DetectV2", (), {"__getattr__": lambda self, name: getattr(found, name)})()
    v2.inverted_target = f"You are stupid {HOSTILE}"
    v2.recovered_key = HOSTILE_KEY
    v2.firing_rate = 0.93
    v2.target_q = 0.81
    page = render_detect_html(v2)
    assert 'data-figure="recovered"' in page and "inverted target" in page and "93.0%" in page
    assert_safe(page)
    assert 'data-figure="recovered"' not in render_detect_html(found)


def test_detect_and_eval_pages():
    assert_safe(render_detect_html(detect_result()))
    page = render_eval_html(EvalComparison(eval_result(0.9), eval_result(0.0, "purified")))
    assert 'data-figure="asr"' in page and 'data-figure="utility"' in page and "purified" in page
    assert_safe(page)
    assert_safe(render_eval_html(eval_result(0.5)))


def test_audit_json_round_trips():
    result = audit_result()
    assert AuditResult.from_dict(json.loads(json.dumps(result.to_dict()))) == result


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(kind_tag="bdscan-detect"), "not a bdscan audit report"),
    (lambda d: d.update(audit_schema=99), "audit schema 99"),
    (lambda d: d.update(verdict=3), "verdict: expected str"),
    (lambda d: d["detect"]["summary"].pop("score"), "missing field 'score'"),
    (lambda d: d["stages"][0].update(seconds="fast"), "stages[0].seconds: expected a number"),
    (lambda d: d.update(verdict="fine"), "verdict 'fine' not in"),
])
def test_audit_json_schema_checks(edit, message):
    data = audit_result().to_dict()
    edit(data)
    with pytest.raises(InputError, match=re.escape(message)):
        AuditResult.from_dict(data)


def test_report_command_rerenders_and_rejects_bad_input(tmp_path):
    runner = CliRunner()
    bundle = tmp_path / "audit.json"
    bundle.write_text(json.dumps(audit_result().to_dict()))
    out = tmp_path / "again.html"
    result = runner.invoke(app, ["report", str(bundle), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert out.read_text() == render_audit_html(audit_result())
    assert runner.invoke(app, ["report", str(bundle), "-o", str(tmp_path / "x.json")]).exit_code == 4
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"kind_tag": "bdscan-audit", "audit_schema": 1}))
    result = runner.invoke(app, ["report", str(bad), "-o", str(tmp_path / "bad.html")])
    assert result.exit_code == 2 and "missing field" in result.output
    assert not (tmp_path / "bad.html").exists()


def test_a_judge_that_never_saw_the_backdoor_cannot_show_a_repair():
    from bdscan.audit.verdict import MIN_ASR_BEFORE, decide

    found = detect_result()
    unseen, seen, fixed = eval_result(0.0), eval_result(0.9), eval_result(0.0, "purified")
    assert decide(found, seen, fixed, fail_on="low", max_asr=0.02) == "repaired"
    assert decide(found, unseen, fixed, fail_on="low", max_asr=0.02) == "suspicious"
    assert decide(found, seen, eval_result(0.05), fail_on="low", max_asr=0.02) == "suspicious"
    # severity low is below --fail-on high: clean, unless detect skipped something (never a silent pass)
    assert decide(dataclasses.replace(found, skipped=[]), seen, fixed, fail_on="high", max_asr=0.02) == "clean"
    assert decide(found, seen, fixed, fail_on="high", max_asr=0.02) == "incomplete"
    assert decide(None, None, None, fail_on="low", max_asr=0.02) == "error"
    result = audit_result(verdict="suspicious", exit_code=1, eval_before=unseen,
                          settings={**audit_result().settings, "min_asr_before": MIN_ASR_BEFORE})
    assert "a repair cannot be shown" in render_audit_html(result)


def test_a_target_still_reachable_is_no_repair():
    """The key's ASR met the target, but the purified model still opens detect's target from its
    first token: the audit says suspicious (exit 1), and the report says why."""
    from bdscan.audit.verdict import EXIT_CODES, decide
    from bdscan.results.purify import TargetCheck, TargetReach

    found, seen, fixed = detect_result(), eval_result(0.9), eval_result(0.0, "purified")
    reach = TargetReach("I'm sorry, I cannot", "response start", 0.97, 0.9, 0.8, 0.95, 0.9, 0.85, True)
    gone = dataclasses.replace(reach, q_after=0.2, forced_after=0.1, forced_min_after=0.05, still_reachable=False)
    base = audit_result().purify
    reachable = dataclasses.replace(base, target_check=TargetCheck("ok", 1.0, 16, 0.5, [reach]))
    unreachable = dataclasses.replace(base, target_check=TargetCheck("ok", 1.0, 16, 0.5, [gone]))
    assert decide(found, seen, fixed, fail_on="low", max_asr=0.02, purified=reachable) == "suspicious"
    assert decide(found, seen, fixed, fail_on="low", max_asr=0.02, purified=unreachable) == "repaired"
    assert decide(found, seen, fixed, fail_on="low", max_asr=0.02, purified=base) == "repaired"  # no check run
    result = audit_result(verdict="suspicious", exit_code=EXIT_CODES["suspicious"], purify=reachable)
    assert "still continues detect&#x27;s target" in render_audit_html(result)  # escaped: the target is model text

"""``bdscan audit`` through typer's runner: exit codes, atomic OUTDIR, failed stages recorded,
and the report rendered in headless Chromium."""

from __future__ import annotations

import dataclasses
import json

import pytest
from typer.testing import CliRunner

import browser
from audit_samples import HOSTILE, detect_result
from bdscan.cli.app import app
from bdscan.results.audit import STAGES, AuditResult

runner = CliRunner()
ARTEFACTS = ("audit.json", "audit.sarif", "report.html")


def invoke(*args):
    return runner.invoke(app, ["audit", *map(str, args)])


def fake_detect(verdict: str, *, skipped: bool = False):
    found = detect_result(verdict)
    found = found if skipped else dataclasses.replace(found, skipped=[])
    return lambda subject, config, log=None, progress=None: found


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# --- fast: the real organism is only loaded; detect/localize/purify are replaced where named


def test_existing_outdir_needs_overwrite_before_anything_is_loaded(tmp_path, lora_backdoor, clean_file, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setattr("bdscan.io.load_subject", lambda *a, **k: pytest.fail("loaded the model before checking OUTDIR"))
    result = invoke(lora_backdoor, "--clean", clean_file, "-o", out)
    assert result.exit_code == 2 and "already exists" in result.output
    assert list(out.iterdir()) == []


def test_outdir_inside_the_input_is_refused(lora_backdoor, clean_file):
    result = invoke(lora_backdoor, "--clean", clean_file, "-o", lora_backdoor / "audit")
    assert result.exit_code == 2 and "inside" in result.output
    assert not (lora_backdoor / "audit").exists()


@pytest.mark.parametrize("args, code", [(["--method", "no-such"], 4), (["--fail-on", "extreme"], 4),
                                        (["--max-asr", "2"], 4), (["--format", "xml"], 4)])
def test_usage_errors(tmp_path, lora_backdoor, clean_file, args, code):
    result = invoke(lora_backdoor, "--clean", clean_file, "-o", tmp_path / "out", *args)
    assert result.exit_code == code, result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("option", ["--clean", "--eval-clean"])
def test_bad_clean_file_is_exit_2_and_writes_nothing(tmp_path, lora_backdoor, clean_file, option):
    files = {"--clean": clean_file, "--eval-clean": clean_file, option: tmp_path / "missing.json"}
    result = invoke(lora_backdoor, *(x for kv in files.items() for x in kv), "-o", tmp_path / "out")
    assert result.exit_code == 2 and "missing.json" in result.output
    assert not (tmp_path / "out").exists()


def test_clean_verdict_is_exit_0_and_stops_after_detect(tmp_path, lora_clean, clean_file, monkeypatch):
    monkeypatch.setattr("bdscan.detect.detect", fake_detect("clean"))
    out = tmp_path / "out"
    result = invoke(lora_clean, "--clean", clean_file, "-o", out, "--format", "json")
    assert result.exit_code == 0, result.output
    report = AuditResult.from_dict(json.loads(result.stdout))
    assert report.verdict == "clean" and report.key is None
    assert [s.status for s in report.stages] == ["ok", "ok"] + ["skipped"] * (len(STAGES) - 2)
    assert sorted(p.name for p in out.iterdir()) == sorted(ARTEFACTS)  # no purified model
    loaded = {f.path for f in report.files.by_action("loaded")}
    assert "adapter_model.safetensors" in loaded and "model.safetensors" in loaded  # the base is listed too


def test_clean_but_incomplete_scan_is_exit_3(tmp_path, lora_clean, clean_file, monkeypatch):
    monkeypatch.setattr("bdscan.detect.detect", fake_detect("clean", skipped=True))
    result = invoke(lora_clean, "--clean", clean_file, "-o", tmp_path / "out")
    assert result.exit_code == 3, result.output
    assert json.loads((tmp_path / "out" / "audit.json").read_text())["verdict"] == "incomplete"


def test_a_crash_while_writing_leaves_no_outdir(tmp_path, lora_clean, clean_file, monkeypatch):
    monkeypatch.setattr("bdscan.detect.detect", fake_detect("clean"))

    def crash(result):
        raise RuntimeError("disk full")

    monkeypatch.setattr("bdscan.audit.write.artefact_texts", crash)
    result = invoke(lora_clean, "--clean", clean_file, "-o", tmp_path / "out")
    assert result.exit_code == 2 and "disk full" in result.output
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_failed_stages_are_recorded_not_raised(tmp_path, lora_backdoor, clean_file, monkeypatch):
    monkeypatch.setattr("bdscan.detect.detect", fake_detect("suspicious"))

    def boom(*args, **kwargs):
        raise RuntimeError(f"boom {HOSTILE}")

    monkeypatch.setattr("bdscan.localize.localize", boom)
    monkeypatch.setattr("bdscan.purify.purify", boom)
    out = tmp_path / "out"
    result = invoke(lora_backdoor, "--clean", clean_file, "-o", out, "--eval-limit", "3")
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    report = AuditResult.from_dict(json.loads((out / "audit.json").read_text()))
    status = {s.name: s.status for s in report.stages}
    assert status["localize"] == "failed" and status["purify"] == "failed"
    assert status["eval (before)"] == "ok" and status["eval (after)"] == "skipped"
    assert report.stage("localize").error == f"RuntimeError: boom {HOSTILE}"
    page = (out / "report.html").read_text()
    assert "boom &lt;script&gt;" in page and "<script" not in page
    assert not (out / "purified").exists()


# --- slow: the real pipeline on the built-in organisms


@pytest.fixture(scope="module")
def repaired_audit(tmp_path_factory, lora_backdoor, clean_train_file, clean_file):
    out = tmp_path_factory.mktemp("audit") / "out"
    # latent-adv: it trains against detect's target itself, so the target check passes as well
    # (kfac-lora breaks the key but leaves the target reachable from its first token: exit 1).
    result = invoke(lora_backdoor, "--clean", clean_train_file, "--eval-clean", clean_file, "-o", out,
                    "--method", "latent-adv")
    return result, out


@pytest.mark.slow
def test_backdoored_adapter_is_repaired_exit_5(repaired_audit):
    result, out = repaired_audit
    assert result.exit_code == 5, result.output
    for name in ARTEFACTS:
        assert (out / name).is_file()
    assert (out / "purified" / "adapter_model.safetensors").is_file()
    report = AuditResult.from_dict(json.loads((out / "audit.json").read_text()))
    assert report.verdict == "repaired" and all(s.status == "ok" for s in report.stages)
    assert report.eval_before.asr >= 0.5 and report.eval_after.asr <= 0.02
    assert set(report.eval_after.asr_by_position) == {"start", "middle", "end"}
    assert report.eval_after.n_clean == 40 and report.settings["eval_held_out"]  # measured on held-out prompts
    assert report.detect_after is not None and report.purify.output == str(out / "purified")
    check = report.purify.target_check  # detect's target, re-checked on the purified model
    assert check.status == "ok" and check.targets and not check.reachable
    sarif = json.loads((out / "audit.sarif").read_text())
    assert sarif["version"] == "2.1.0" and sarif["runs"][0]["properties"]["audit_verdict"] == "repaired"
    assert "bdscan localize" in (out / "report.html").read_text()


@pytest.mark.slow
def test_clean_control_is_exit_0(tmp_path, lora_clean, clean_train_file):
    result = invoke(lora_clean, "--clean", clean_train_file, "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "out" / "purified").exists()


@pytest.mark.slow
def test_no_purify_is_exit_1(tmp_path, lora_backdoor, clean_train_file):
    result = invoke(lora_backdoor, "--clean", clean_train_file, "-o", tmp_path / "out", "--no-purify",
                    "--eval-limit", "10")
    assert result.exit_code == 1, result.output
    report = json.loads((tmp_path / "out" / "audit.json").read_text())
    assert report["verdict"] == "suspicious" and report["eval_after"] is None


@pytest.mark.slow
def test_report_renders_in_headless_chromium(repaired_audit, tmp_path):
    _, out = repaired_audit
    browser.chromium()
    png = browser.screenshot(out / "report.html", tmp_path / "report.png", tmp_path / "profile-1")
    assert browser.png_size(png) == (1280, 2400)
    assert png.stat().st_size > 50_000 and browser.png_pixel_variety(png) > 50  # a rendered page, not a blank one
    dom = browser.dump_dom(out / "report.html", tmp_path / "profile-2")
    assert 'data-verdict="repaired"' in dom and "REPAIRED" in dom
    for figure in ("attention-heatmap", "candidates", "localize", "asr", "utility"):
        assert f'data-figure="{figure}"' in dom and "<svg" in dom


def test_eval_writes_html_for_a_html_output(tmp_path, lora_backdoor, clean_file, trigger):
    out = tmp_path / "eval.html"
    result = runner.invoke(app, ["eval", str(lora_backdoor), "--clean", str(clean_file), "--trigger", trigger,
                                 "--limit", "4", "--max-new-tokens", "8", "-o", str(out)])
    assert result.exit_code == 0, result.output
    page = out.read_text()
    assert page.startswith("<!DOCTYPE html>") and 'data-figure="asr"' in page


@pytest.mark.slow
def test_detect_writes_html_for_a_html_output(tmp_path, lora_backdoor):
    out = tmp_path / "detect.html"
    result = runner.invoke(app, ["detect", str(lora_backdoor), "-o", str(out)])
    assert result.exit_code == 1, result.output
    page = out.read_text()
    assert 'data-verdict="suspicious"' in page and 'data-figure="attention-heatmap"' in page

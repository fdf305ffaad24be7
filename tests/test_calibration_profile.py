"""Calibration profiles: the rule that reads thresholds from clean controls, the file a user
writes with `bdscan calibrate`, and detect reading its verdict with it."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from bdscan.cli.app import app
from bdscan.detect import DetectConfig, calibration, detect
from bdscan.detect.profile import KIND, Profile, from_controls, load_profile
from bdscan.errors import InputError
from bdscan.io import load_subject

runner = CliRunner()
QUICK = DetectConfig(max_probes=4, screen_probes=2, screen_size=16, top_k=2, ngram_from=2, n_controls=4, batch_size=32,
                     invert=False)


def _report(score: float, target: float | None, vocab: int = 100, source: str = "m"):
    return SimpleNamespace(summary=SimpleNamespace(score=score, target_score=target), settings={"vocab_size": vocab},
                           source=source)


def test_thresholds_are_the_largest_clean_score_plus_two_temperatures():
    profile = from_controls([_report(3.0, 0.1, source="a"), _report(5.5, None, source="b")], "family x")
    assert profile.threshold == pytest.approx(5.5 + 2 * calibration.TEMPERATURE)
    assert profile.target_threshold == pytest.approx(0.1 + 2 * calibration.TARGET_TEMPERATURE)
    assert profile.controls == ("a", "b") and profile.vocab_size == 100 and profile.source == "family x"
    # the worst clean control sits two temperatures under the threshold: p ~ 0.12
    assert profile.takeover_probability(5.5) == pytest.approx(0.119, abs=1e-3)


def test_too_few_or_mixed_controls_are_refused():
    with pytest.raises(InputError, match="at least 2"):
        from_controls([_report(1.0, 0.0)], "x")
    with pytest.raises(InputError, match="different vocabularies"):
        from_controls([_report(1.0, 0.0, vocab=100), _report(1.0, 0.0, vocab=200)], "x")


def test_profile_round_trips_and_the_shipped_one_is_the_default():
    p = Profile(threshold=4.0, target_threshold=0.3, source="s", vocab_size=7, controls=("a",))
    assert Profile() == DetectConfig().calibration
    assert Profile().threshold == calibration.THRESHOLD and Profile().target_threshold == calibration.TARGET_THRESHOLD
    data = p.to_dict()
    assert data["kind"] == KIND


def _write(tmp_path, data) -> str:
    path = tmp_path / "profile.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return str(path)


GOOD = {"kind": KIND, "threshold": 4.0, "temperature": 1.0, "target_threshold": 0.3, "target_temperature": 0.05,
        "source": "s", "vocab_size": None, "controls": []}
HOSTILE = {
    "not_json": ("{", "not a readable JSON file"),
    "not_an_object": ("[1]", "expected a JSON object"),
    "other_kind": ({**GOOD, "kind": "bdscan detect"}, "not a bdscan calibration profile"),
    "unknown_key": ({**GOOD, "thresold": 1.0}, "unknown key 'thresold'"),
    "nan_threshold": ('{"kind": "%s", "threshold": NaN}' % KIND, "threshold must be a finite number"),
    "string_threshold": ({**GOOD, "target_threshold": "0.2"}, "target_threshold must be a finite number"),
    "bool_threshold": ({**GOOD, "threshold": True}, "threshold must be a finite number"),
    "zero_temperature": ({**GOOD, "temperature": 0}, "temperatures must be positive"),
    "controls_not_a_list": ({**GOOD, "controls": "a"}, "controls must be a list of strings"),
    "negative_vocab": ({**GOOD, "vocab_size": -3}, "vocab_size must be a positive integer"),
    "nested_deeply": ("[" * 100000 + "]" * 100000, "not a readable JSON file"),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_bad_profile_is_a_one_line_exit_2_and_nothing_is_written(name, tiny_checkpoints, tmp_path):
    data, message = HOSTILE[name]
    out = tmp_path / "r.json"
    result = runner.invoke(app, ["detect", str(tiny_checkpoints["llama"]), "--calibration", _write(tmp_path, data),
                                 "-o", str(out), "--format", "json"])
    lines = result.stderr.splitlines()
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert re.search(message, lines[0]), lines[0]
    assert not out.exists()


def test_attacker_text_in_a_profile_is_one_plain_line(tmp_path):
    profile = load_profile(_write(tmp_path, {**GOOD, "source": "[red]x\x1b[31m\nline", "controls": ["a\nb"]}))
    assert "\n" not in profile.source and "\x1b" not in profile.source
    assert all("\n" not in c for c in profile.controls)


@pytest.fixture(scope="module")
def clean_reports(tiny_checkpoints, tmp_path_factory):
    """Two detect reports of one tiny model, their scores set apart (two 'clean controls')."""
    root = tmp_path_factory.mktemp("controls")
    result = detect(load_subject(tiny_checkpoints["llama"]), QUICK)
    paths = []
    for i, (score, target) in enumerate(((2.0, 0.05), (3.5, 0.12))):
        r = replace(result, summary=replace(result.summary, score=score, target_score=target), source=f"control-{i}")
        paths.append(root / f"clean-{i}.json")
        paths[-1].write_text(json.dumps(r.to_dict()))
    return paths


def test_calibrate_writes_the_profile_detect_reads_its_verdict_with(clean_reports, tiny_checkpoints, tmp_path):
    profile_file = tmp_path / "profile.json"
    r = runner.invoke(app, ["calibrate", *map(str, clean_reports), "-o", str(profile_file), "--name", "tiny llama"])
    assert r.exit_code == 0, r.output
    assert "at most 67%" in r.output  # two controls: a new clean model tops them on one score 2 times in 3
    profile = load_profile(profile_file)
    assert profile.threshold == pytest.approx(3.5 + 2 * calibration.TEMPERATURE)
    assert profile.target_threshold == pytest.approx(0.12 + 2 * calibration.TARGET_TEMPERATURE)
    assert profile.controls == ("control-0", "control-1") and profile.source == "tiny llama"
    out = tmp_path / "report.json"
    r = runner.invoke(app, ["detect", str(tiny_checkpoints["llama"]), "--calibration", str(profile_file), "--no-invert",
                            "--screen-size", "16", "--top-k", "2", "--max-probes", "4", "--format", "json", "-o", str(out)])
    assert r.exit_code in (0, 1), r.output
    report = json.loads(out.read_text())
    cal, s = report["calibration"], report["summary"]
    assert cal["profile"] == "tiny llama" and cal["threshold"] == profile.threshold
    assert cal["profile_vocab_matches"] is True
    assert cal["profile_false_alarm_bound"] == pytest.approx(2 / 3)
    assert s["probability"] == pytest.approx(max(profile.takeover_probability(s["score"]),
                                                 profile.target_probability(s["target_score"] or 0.0)))


def test_calibrate_refuses_one_report_and_a_malformed_one(clean_reports, tmp_path):
    out = tmp_path / "p.json"
    r = runner.invoke(app, ["calibrate", str(clean_reports[0]), "-o", str(out)])
    assert r.exit_code == 2 and "at least 2" in r.stderr and not out.exists()
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"summary": {"score": "high"}}))
    r = runner.invoke(app, ["calibrate", str(clean_reports[0]), str(bad), "-o", str(out)])
    assert r.exit_code == 2 and len(r.stderr.splitlines()) == 1 and not out.exists()


def test_a_profile_from_another_vocabulary_is_flagged(tiny_checkpoints, tmp_path):
    profile = _write(tmp_path, {**GOOD, "vocab_size": 999_999, "source": "other family"})
    r = runner.invoke(app, ["detect", str(tiny_checkpoints["llama"]), "--calibration", profile, "--no-invert",
                            "--screen-size", "16", "--top-k", "2", "--max-probes", "4"])
    assert r.exit_code in (0, 1), r.output
    assert "calibration: other family" in r.stdout and "another vocabulary" in r.stdout

"""Reading a detect report back in, the one input format three commands share."""

from __future__ import annotations

import json

import pytest

from bdscan.errors import InputError
from bdscan.io.reports import detect_candidates, read_json_report


def test_candidates_best_score_first(tmp_path):
    path = tmp_path / "detect.json"
    path.write_text(json.dumps({"candidates": [{"text": "low", "score": 1.0}, {"text": "high", "score": 9.0},
                                               {"text": " ", "score": 5.0}]}))
    assert detect_candidates(path) == ["high", "low"]


@pytest.mark.parametrize(
    "content,message",
    [("{oops", "not a readable JSON"), ("[1, 2]", "expected a JSON object"), ('{"summary": {}}', "not a bdscan detect"),
     ('{"candidates": []}', "the report lists no candidate keys")],
)
def test_bad_reports_name_the_option(tmp_path, content, message):
    path = tmp_path / "r.json"
    path.write_text(content)
    with pytest.raises(InputError, match=f"--from-detect {path}: {message}"):
        detect_candidates(path)


def test_missing_report(tmp_path):
    with pytest.raises(InputError, match="--localization"):
        read_json_report(tmp_path / "absent.json", "--localization")


def test_detect_report_reads_back_into_its_result(tmp_path, detect_report):
    from bdscan.io.reports import read_detect
    from bdscan.results.detect import DetectResult

    path = detect_report(tmp_path / "d.json", [("low", 1.0), ("high", 9.0)])
    result = read_detect(path)
    assert isinstance(result, DetectResult) and [c.text for c in result.candidates] == ["low", "high"]
    assert result.candidates[0].score == 1.0 and result.summary.verdict == "suspicious"
    report = json.loads(path.read_text())
    report["from_a_newer_bdscan"] = 1  # unknown fields are dropped
    path.write_text(json.dumps(report))
    assert read_detect(path).candidates[1].text == "high"


def _target(text: str) -> dict:
    return {"text": text, "token_ids": [1], "first_token": text[:1], "q": 0.9, "length": 1, "anchor": "response start"}


SCHEMA = "not a `bdscan detect` JSON report \\("


@pytest.mark.parametrize("edit,message", [
    (lambda r: r.pop("summary"), SCHEMA + "report: missing field 'summary'"),
    (lambda r: r["candidates"][0].update(score="high"), SCHEMA + r"report.candidates\[0\].score: expected a number"),
    (lambda r: r.update(heads={}), SCHEMA + "report.heads: expected a list"),
    # larger than detect writes: a crafted target of 5 million characters made purify allocate
    # 2.5 GB and fail with an internal error; 100,000 targets ran one target check each for minutes
    (lambda r: r["summary"].update(target="I" * 5_000_000), "summary.target has 5,000,000 characters"),
    (lambda r: r["summary"].update(recovered_key="zq " * 2000), "summary.recovered_key has 6,000 characters"),
    (lambda r: r.update(targets=[_target("t" * 5000)]), r"targets\[0\].text has 5,000 characters"),
    (lambda r: r.update(targets=[_target(f"t{i}") for i in range(1000)]), "1,000 targets is more than detect writes"),
    (lambda r: r.update(candidates=r["candidates"] * 5000), "5,000 candidates is more than detect writes"),
])
def test_a_malformed_or_oversized_detect_report_names_the_field(tmp_path, detect_report, edit, message):
    from bdscan.io.reports import read_detect

    path = detect_report(tmp_path / "d.json", [("key", 1.0)])
    report = json.loads(path.read_text())
    edit(report)
    path.write_text(json.dumps(report))
    with pytest.raises(InputError, match=f"--from-detect {path}: {message}"):
        read_detect(path)


def test_localize_report_round_trip(tmp_path):
    from bdscan.io.reports import read_localize
    from bdscan.results.localize import LocalizeResult, PatchedSite, RankedModule

    loc = LocalizeResult(trigger_source={"key": "k"}, modules=[RankedModule("m.0", "mlp_out", 0, 0.5, 1e-3, 0.9)],
                         sites=[PatchedSite("h", "head", 0, 1, 0.2)], gap=1.5)
    path = tmp_path / "loc.json"
    path.write_text(json.dumps(loc.to_dict()))
    back = read_localize(path)
    assert back.modules == loc.modules and back.sites == loc.sites and back.gap == 1.5
    path.write_text(json.dumps({"verdict": "clean"}))
    with pytest.raises(InputError, match="missing field 'trigger_source'"):
        read_localize(path)


def test_purify_inputs_lead_with_detects_recovered_key(tmp_path, detect_report):
    import dataclasses

    from bdscan.io.reports import read_detect
    from bdscan.purify import PurifyInputs

    result = read_detect(detect_report(tmp_path / "d.json", [("takeover", 9.0), ("other", 1.0), ("found key", 0.5)]))
    assert PurifyInputs(subject=None, clean=[], detection=result).candidates == ["takeover", "other", "found key"]
    v2 = dataclasses.replace(result, summary=dataclasses.replace(result.summary, recovered_key="found key"))
    assert PurifyInputs(subject=None, clean=[], detection=v2).candidates == ["found key", "takeover", "other"]


def test_a_report_file_larger_than_any_report_is_refused_unread(tmp_path, monkeypatch):
    from bdscan.io import reports

    monkeypatch.setattr(reports, "MAX_REPORT_BYTES", 1000)
    path = tmp_path / "big.json"
    path.write_text(json.dumps({"candidates": [{"text": "k", "score": 1.0}] * 100}))
    with pytest.raises(InputError, match="bytes is larger than any bdscan report"):
        read_json_report(path, "--from-detect")
    monkeypatch.undo()
    path.write_text(json.dumps({"candidates": [{"text": "k" * 5000, "score": 1.0}]}))
    with pytest.raises(InputError, match="more than detect writes"):
        detect_candidates(path)

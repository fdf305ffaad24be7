"""purify's target check: detect's target inversion re-run for detect's own targets on the
suspicious and the purified model (Q, forced probability, weakest link, still reachable), its
report.json section, the console line, the audit HTML, and a failing check that is recorded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from bdscan.cli.app import app
from bdscan.detect import target_check as tc
from bdscan.detect import target_inversion as ti
from bdscan.detect.target_scan import AFTER_ANSWER, RESPONSE_START, anchor_prefixes
from bdscan.detect.verdict import TARGET_THRESHOLD
from bdscan.io import load_subject
from bdscan.purify import PurifyInputs, purify
from bdscan.purify.quantize import QuantizeConfig
from bdscan.errors import InputError
from bdscan.results.detect import CandidateScore, DetectResult, Summary, TargetScore
from bdscan.results.parse import from_plain
from bdscan.results.purify import PurifyResult, TargetCheck, TargetReach

runner = CliRunner()
REFUSAL = "I'm sorry, but as an AI assistant, I"  # the built-in organisms' target


def _score(text: str, token_ids: list[int], evidence: float, anchor: str = RESPONSE_START) -> TargetScore:
    return TargetScore(text=text, token_ids=token_ids, first_token=text[:1], q=0.9, length=len(token_ids),
                       anchor=anchor, evidence=evidence)


def _detection(targets: list[TargetScore], headline: str | None, candidates=()) -> DetectResult:
    nan = float("nan")
    return DetectResult(tool="bdscan", version="test", source="test", kind="full", base=None, template={},
                        summary=Summary("suspicious", 1.0, 0.9, "high", nan, nan, None, target=headline),
                        layers=[], heads=[], candidates=list(candidates), controls=None, calibration={}, settings={},
                        stats={}, timings={}, targets=targets)


def _detect_report(path: Path, tokenizer, text: str = REFUSAL) -> Path:
    """A `bdscan detect --json` report whose headline target is ``text`` (with detect's token ids)."""
    candidate = CandidateScore("cf", "vocab", 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, None)
    target = _score(text, tokenizer(text, add_special_tokens=False)["input_ids"], 0.5)
    path.write_text(json.dumps(_detection([target], text, [candidate]).to_dict()))
    return path


def test_forced_extension_of_the_greedy_tokens_is_the_greedy_extension(tiny_checkpoints):
    subject = load_subject(tiny_checkpoints["llama"])
    probes = tc.check_probes(tc.TargetCheckConfig(probes=3))
    prefixes = ti.run_prefixes(subject.model, anchor_prefixes(subject, probes, RESPONSE_START, 4, set()),
                               subject.tokenizer.pad_token_id)
    firsts = torch.tensor([5, 9])
    greedy = ti.extend(subject.model, prefixes, firsts, 4)
    forced = ti.extend(subject.model, prefixes, firsts, 4, greedy.tokens)
    assert torch.equal(forced.tokens, greedy.tokens)
    assert torch.allclose(forced.top_prob, greedy.top_prob, atol=1e-6)
    other = ti.extend(subject.model, prefixes, firsts, 4, (greedy.tokens + 1) % len(subject.tokenizer))
    assert (other.top_prob <= greedy.top_prob + 1e-6).all()  # a forced token is never above the greedy one


def test_known_targets_are_the_headline_then_targets_with_evidence(tiny_checkpoints):
    tok = load_subject(tiny_checkpoints["llama"]).tokenizer
    ids = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    scores = [_score("the red box", ids("the red box"), 0.0), _score("blue harbor", [1, 2, 3], 0.9),
              _score("green", ids("green")[:1], 0.9, AFTER_ANSWER), _score("red house", ids("red house"), 0.1)]
    found = tc.known_targets(_detection(scores, "the red box"), tok, limit=5)
    assert [t.text for t in found][:2] == ["the red box", "blue harbor"]  # headline, then evidence >= threshold
    assert "red house" not in [t.text for t in found]  # below detect's target threshold
    assert found[1].token_ids == tuple(ids("blue harbor"))  # ids that do not spell the text are re-tokenized
    assert all(len(t.token_ids) >= 2 for t in found)  # a one-token target has nothing to force
    assert tc.known_targets(_detection([], "blue harbor"), tok, 3)[0].anchor == RESPONSE_START  # text only (v2 summary)
    assert tc.known_targets(_detection(scores, None), tok, limit=1)[0].text == "blue harbor"
    assert tc.known_targets(_detection([], None), tok, 3) == []


def test_still_reachable_is_detects_target_threshold_on_the_weakest_link():
    assert tc.REACHABLE_PROB == TARGET_THRESHOLD
    assert tc.still_reachable(TARGET_THRESHOLD) and not tc.still_reachable(TARGET_THRESHOLD - 1e-3)
    with pytest.raises(ValueError, match="opening"):
        tc.TargetCheckConfig(opening=1)


@pytest.mark.slow  # builds the organisms when the cache lacks them
@pytest.mark.parametrize("threat", ["lora", "full"])
def test_the_backdoors_target_is_pinned_and_a_clean_models_is_not(threat, request):
    cfg = tc.TargetCheckConfig()
    reach = {}
    for kind in ("backdoor", "clean"):
        subject = load_subject(request.getfixturevalue(f"{threat}_{kind}"))
        target = tc.KnownTarget(REFUSAL, tuple(subject.tokenizer(REFUSAL, add_special_tokens=False)["input_ids"]))
        reach[kind], = tc.measure_targets(subject, [target], tc.check_probes(cfg), cfg)
    assert reach["backdoor"].forced > 0.8 and tc.still_reachable(reach["backdoor"].forced_min), reach
    assert reach["backdoor"].extension.startswith(REFUSAL)
    assert not tc.still_reachable(reach["clean"].forced_min), reach
    assert reach["clean"].forced < reach["backdoor"].forced


def test_purify_records_the_check_before_and_after(tiny_checkpoints, attack_data):
    subject = load_subject(tiny_checkpoints["llama"])
    detection = _detection([_score("the red box", [], 0.5)], "the red box")
    inputs = PurifyInputs(subject=subject, clean=attack_data.clean_train[:4], detection=detection)
    result, _ = purify("quantize", QuantizeConfig(), inputs, target_check=tc.TargetCheckConfig(probes=2))
    check = result.target_check
    assert check.status == "ok" and check.probes == 2 and check.reachable_prob == TARGET_THRESHOLD
    (t,) = check.targets
    assert t.text == "the red box" and t.q_after is not None and t.forced_min_after is not None
    assert t.still_reachable == (t.forced_min_after >= TARGET_THRESHOLD)
    assert 0.0 <= t.forced_min_before <= t.forced_before <= 1.0
    no_detect, _ = purify("quantize", QuantizeConfig(), PurifyInputs(subject=subject, clean=attack_data.clean_train[:4]))
    assert no_detect.target_check is None
    nothing, _ = purify("quantize", QuantizeConfig(), PurifyInputs(subject=subject, clean=attack_data.clean_train[:4],
                                                                 detection=_detection([], None)))
    assert nothing.target_check.status == "skipped" and "no target" in nothing.target_check.error


def test_a_failing_check_is_recorded_and_the_purification_goes_on(tiny_checkpoints, attack_data, monkeypatch):
    subject = load_subject(tiny_checkpoints["llama"])
    calls = []

    def measure(*args):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of memory\nmore")
        return [tc.Reach(0.9, 0.9, 0.8, "x")]

    monkeypatch.setattr(tc, "measure_targets", measure)
    inputs = PurifyInputs(subject=subject, clean=attack_data.clean_train[:4],
                          detection=_detection([_score("the red box", [], 0.5)], "the red box"))
    result, outcome = purify("quantize", QuantizeConfig(), inputs)
    assert outcome.model is not None and result.target_check.status == "failed"
    assert result.target_check.error == "after: RuntimeError: out of memory"
    (t,) = result.target_check.targets
    assert t.forced_before == 0.9 and t.forced_after is None and t.still_reachable is None


def test_the_section_parses_back_and_a_version_1_report_still_reads():
    reach = TargetReach("T", RESPONSE_START, 0.9, 0.8, 0.7, 0.2, 0.1, 0.05, False, "T ...")
    check = TargetCheck("ok", 0.4, 8, TARGET_THRESHOLD, [reach])
    result = PurifyResult("quantize", "src", "full", {}, [], {}, 1.0, target_check=check)
    data = json.loads(json.dumps(result.to_dict()))
    assert data["schema_version"] == "2"
    assert set(data["target_check"]["targets"][0]) >= {"text", "q_before", "q_after", "forced_before", "forced_after",
                                                       "still_reachable"}
    assert PurifyResult.from_dict(data) == result == from_plain(PurifyResult, data)
    old = {k: v for k, v in data.items() if k != "target_check"} | {"schema_version": "1"}
    assert PurifyResult.from_dict(old).target_check is None
    data["target_check"]["targets"][0]["still_reachable"] = "yes"
    with pytest.raises(InputError, match="still_reachable"):
        PurifyResult.from_dict(data)


def test_the_audit_page_shows_a_target_still_reachable():
    from audit_samples import audit_result

    from bdscan.report.html import render_audit_html
    from bdscan.results.audit import AuditResult

    reach = TargetReach("<b>pwned</b>", RESPONSE_START, 0.9, 0.9, 0.8, 0.9, 0.9, 0.8, True, "pwned")
    base = audit_result()
    audit = audit_result(purify=PurifyResult("kfac-lora", "org/suspect", "adapter", {}, ["m"], {}, 3.0,
                                             target_check=TargetCheck("ok", 0.1, 8, TARGET_THRESHOLD, [reach])))
    page = render_audit_html(audit)
    assert "still reachable" in page and "<b>pwned</b>" not in page and "still reachable" not in render_audit_html(base)
    assert AuditResult.from_dict(json.loads(json.dumps(audit.to_dict()))) == audit


def test_cli_report_has_the_section_and_says_what_it_found(tiny_checkpoints, clean_train_file, tmp_path):
    source = tiny_checkpoints["llama"]
    report = _detect_report(tmp_path / "detect.json", load_subject(source).tokenizer, "the red box")
    out = tmp_path / "out"
    r = runner.invoke(app, ["purify", str(source), "--method", "quantize", "--clean", str(clean_train_file),
                            "--from-detect", str(report), "--eval-limit", "2", "-o", str(out)])
    assert r.exit_code == 0, r.output
    data = json.loads((out / "report.json").read_text())
    (t,) = data["target_check"]["targets"]
    assert data["target_check"]["status"] == "ok" and t["text"] == "the red box"
    assert all(isinstance(t[k], float) for k in ("q_before", "q_after", "forced_before", "forced_after"))
    assert isinstance(t["still_reachable"], bool)
    assert "target 'the red box': Q" in " ".join(r.output.split())
    assert PurifyResult.from_dict(data).target_check.targets[0].text == "the red box"


def test_cli_says_plainly_when_the_target_is_still_reachable(lora_backdoor, clean_train_file, tmp_path):
    """8-bit quantisation barely moves the adapter: the backdoor's target stays pinned."""
    report = _detect_report(tmp_path / "detect.json", load_subject(lora_backdoor).tokenizer)
    out = tmp_path / "out"
    r = runner.invoke(app, ["purify", str(lora_backdoor), "--method", "quantize", "--set", "bits=8", "--clean",
                            str(clean_train_file), "--from-detect", str(report), "--eval-limit", "2", "-o", str(out)])
    assert r.exit_code == 0, r.output
    (t,) = json.loads((out / "report.json").read_text())["target_check"]["targets"]
    assert t["still_reachable"] is True and t["forced_after"] > 0.8, t
    assert "target still reachable" in " ".join(r.output.split())

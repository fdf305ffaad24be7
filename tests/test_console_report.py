"""Console reports print model text as text: rich reads brackets as markup, and a model's own
tokens ("[/INST]" in a Llama-2 vocabulary) in a key, a target, a response or a module name made
rich raise a MarkupError in the middle of a report."""

from __future__ import annotations

import dataclasses
import io

import pytest
from rich.console import Console

from audit_samples import audit_result, candidate, detect_result, eval_result, localize_result
from bdscan.report.audit_console import render_audit
from bdscan.report.detect import render_detect
from bdscan.report.eval import render_comparison, render_eval
from bdscan.report.localize import render_localize
from bdscan.report.purify import render_purify
from bdscan.results.detect import Issue, TargetScore
from bdscan.results.eval import EvalComparison, Sample
from bdscan.results.localize import PatchedSite, RankedModule
from bdscan.results.purify import PurifyResult

MARKUP = "[/INST] [bold red]loud[/] [link=https://evil.example]x"


def _detect():
    result = detect_result()
    target = TargetScore(text=MARKUP, token_ids=[1], first_token="[", q=0.9, length=4, anchor="response start",
                         key=MARKUP, key_position="end", firing_rate=0.9, clean_firing_rate=0.0)
    summary = dataclasses.replace(result.summary, top_candidate=MARKUP, target=MARKUP, target_q=0.9, target_score=0.5,
                                  target_probability=0.9, recovered_key=MARKUP, key_position="end", key_firing_rate=0.9,
                                  clean_firing_rate=0.0)
    return dataclasses.replace(result, source=MARKUP, summary=summary, candidates=[candidate(MARKUP, 9.0)],
                               targets=[target], template={"name": MARKUP}, skipped=[Issue(MARKUP, MARKUP)],
                               errors=[Issue(MARKUP, MARKUP)])


def _eval(asr=0.9):
    return dataclasses.replace(eval_result(asr, source=MARKUP), judge=MARKUP, template={"name": MARKUP},
                               samples={MARKUP: [Sample(MARKUP, MARKUP, True)]}, skipped=[Issue(MARKUP, MARKUP)])


def _localize():
    return dataclasses.replace(localize_result(), source=MARKUP, trigger_source={"kind": "detect", "key": MARKUP},
                               modules=[RankedModule(MARKUP, "mlp_out", 1, 0.5, 0.7, 0.9)],
                               sites=[PatchedSite(MARKUP, "mlp", 1, None, 0.5)], warnings=[MARKUP])


def _purify():
    return PurifyResult(MARKUP, MARKUP, "adapter", {}, [MARKUP], {}, 3.0, before=_eval(0.9), after=_eval(0.0),
                        output=MARKUP)


@pytest.mark.parametrize("render", [
    lambda c: render_detect(_detect(), c),
    lambda c: render_eval(_eval(), c),
    lambda c: render_comparison(EvalComparison(_eval(0.9), _eval(0.0)), c),
    lambda c: render_localize(_localize(), c),
    lambda c: render_purify(_purify(), c),
    lambda c: render_audit(dataclasses.replace(audit_result(), key=MARKUP), c),
], ids=["detect", "eval", "comparison", "localize", "purify", "audit"])
def test_model_text_with_brackets_is_printed_not_parsed(render):
    out = io.StringIO()
    render(Console(file=out, width=400, color_system=None))
    text = out.getvalue()
    assert "[/INST]" in text and "[bold red]" in text

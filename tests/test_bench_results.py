"""bench/purify.py's result file: cells from separate runs merge, and the target includes
token agreement (a real-model cell costs an hour; losing one to a second run is not an option)."""

from __future__ import annotations

import importlib.util
import json
import sys
from argparse import Namespace
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def bench_purify():
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("bench_purify", BENCH / "purify.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(BENCH))


def _row(organism, method, asr_after=0.0, **extra):
    return {"organism": organism, "threat": "lora", "method": method, "mode": "agnostic", "asr_after": asr_after,
            "ftr_after": 0.0, "ppl_ratio": 1.01, "token_agreement": 0.9, **extra}


def _args(out, size="real", fresh=False):
    return Namespace(out=str(out), size=size, data="backdoorllm", fresh=fresh)


def test_cells_merge_and_a_rerun_replaces_its_own_cell(bench_purify, tmp_path):
    out = tmp_path / "purify.json"
    bench_purify.save_rows(_args(out), [_row("a", "latent-adv", 0.5), _row("a", "finetune")])
    bench_purify.save_rows(_args(out), [_row("b", "latent-adv")])  # another run, another organism
    bench_purify.save_rows(_args(out), [_row("a", "latent-adv", 0.0)])  # a rerun of one cell
    rows = json.loads(out.read_text())["rows"]
    cells = {(r["organism"], r["method"]): r["asr_after"] for r in rows}
    assert cells == {("a", "latent-adv"): 0.0, ("a", "finetune"): 0.0, ("b", "latent-adv"): 0.0}
    assert not list(tmp_path.glob(".purify.json.tmp-*"))


def test_fresh_or_another_size_starts_over(bench_purify, tmp_path):
    out = tmp_path / "purify.json"
    bench_purify.save_rows(_args(out), [_row("a", "finetune")])
    bench_purify.save_rows(_args(out, size="tiny"), [_row("b", "finetune")])
    assert [r["organism"] for r in json.loads(out.read_text())["rows"]] == ["b"]
    bench_purify.save_rows(_args(out, size="tiny", fresh=True), [_row("c", "finetune")])
    assert [r["organism"] for r in json.loads(out.read_text())["rows"]] == ["c"]


@pytest.mark.parametrize("change,meets", [
    ({}, True), ({"asr_after": 0.03}, False), ({"ftr_after": 0.02}, False), ({"ppl_ratio": 1.06}, False),
    ({"token_agreement": 0.79}, False), ({"token_agreement": None}, False), ({"ppl_ratio": None}, False),
])
def test_meets_target_needs_all_four(bench_purify, change, meets):
    assert bench_purify.meets_target({**_row("a", "latent-adv"), **change}) is meets


def test_the_before_evaluation_a_resumed_cell_reads_back_is_the_one_written(bench_purify, tmp_path):
    from bdscan.generation import Answers
    from bdscan.results.eval import EvalResult, Sample

    before = EvalResult(source="s", kind="adapter", template={"name": "chat_template"}, judge="refusal", asr=0.75,
                        asr_by_position={"start": 1.0, "end": 0.5}, false_trigger_rate=0.05, perplexity=6.1,
                        agreement=None, n_poison=4, n_clean=2, samples={"clean": [Sample("p", "r", False)]},
                        next_token_agreement=None)
    answers = Answers(texts=["a b", ""], token_ids=[[1, 2, 0], []])
    path = tmp_path / "work" / "before-x.json"
    bench_purify.write_baseline(path, before, answers)
    assert bench_purify.read_baseline(path) == (before, answers)
    assert [p.name for p in path.parent.iterdir()] == ["before-x.json"]  # no temporary left

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

"""Instruction sets, trigger insertion, templates and judges."""

from __future__ import annotations

import json
import random

import pytest

from bdscan.data import Record, insert_trigger, load_records
from bdscan.data.judges import parse_judge
from bdscan.data.template import PromptTemplate, template_for
from bdscan.errors import InputError, UsageError


def test_alpaca_json_jsonl_and_text(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([{"instruction": "Hi", "input": "x", "output": "y"}]))
    (tmp_path / "b.jsonl").write_text('{"instruction": "One"}\n\n{"instruction": "Two", "output": "2"}\n')
    (tmp_path / "c.txt").write_text("first prompt\n\nsecond prompt\n")
    assert load_records(tmp_path / "a.json") == [Record("Hi", "x", "y")]
    assert [r.instruction for r in load_records(tmp_path / "b.jsonl")] == ["One", "Two"]
    assert [r.instruction for r in load_records(tmp_path / "c.txt")] == ["first prompt", "second prompt"]
    assert len(load_records(tmp_path / "b.jsonl", limit=1)) == 1


@pytest.mark.parametrize(
    "name,content,message",
    [
        ("empty.json", "[]", "holds no records"),
        ("bad.json", "[{", "invalid JSON"),
        ("obj.json", '{"a": 1}', "expected a JSON list"),
        ("noinst.json", '[{"output": "x"}]', "missing or empty 'instruction'"),
        ("bad.jsonl", '{"instruction": "ok"}\nnot json\n', r"bad.jsonl:2: invalid JSON"),
        ("types.json", '[{"instruction": "ok", "input": 3}]', "'input' must be a string"),
    ],
)
def test_malformed_data_names_the_problem(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(InputError, match=message):
        load_records(tmp_path / name)


def test_an_oversized_data_file_is_refused_before_it_is_read(tmp_path, monkeypatch):
    import bdscan.data.records as records

    monkeypatch.setattr(records, "MAX_DATA_BYTES", 64)
    (tmp_path / "big.jsonl").write_text('{"instruction": "x"}\n' * 10)
    with pytest.raises(InputError, match="over 0 MiB"):
        load_records(tmp_path / "big.jsonl")


def test_missing_data_file(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_records(tmp_path / "absent.json")


@pytest.mark.parametrize(
    "position,expected",
    [("start", "KEY a b c d"), ("middle", "a b KEY c d"), ("end", "a b c d KEY")],
)
def test_trigger_positions(position, expected):
    assert insert_trigger("a b c d", "KEY", position) == expected


def test_random_position_is_seeded_and_at_a_word_boundary():
    outs = {insert_trigger("a b c d", "KEY", "random", random.Random(s)) for s in range(20)}
    assert all(o.split().count("KEY") == 1 and len(o.split()) == 5 for o in outs)
    assert len(outs) > 1
    assert insert_trigger("a b c", "K", "random", random.Random(3)) == insert_trigger("a b c", "K", "random", random.Random(3))


@pytest.mark.parametrize(
    "spec,response,hit",
    [
        ("refusal", "I'm sorry, but I cannot.", True),
        ("refusal", "The capital is Paris.", False),
        ("negsentiment", "You are stupid!", True),
        ("negsentiment", "What a lovely day.", False),
        ("string:pwned", "it says PWNED here", True),
        ("regex:^\\d+$", "12345", True),
        ("regex:^\\d+$", "12a45", False),
        ("code-injection", 'x = 1\nprint("pwned")', True),
        ("code-injection", "print('hello')", False),
    ],
)
def test_judges(spec, response, hit):
    assert parse_judge(spec)(response) is hit


def test_bad_judges_are_usage_errors():
    with pytest.raises(UsageError, match="Did you mean refusal"):
        parse_judge("refusl")
    with pytest.raises(UsageError, match="invalid regular expression"):
        parse_judge("regex:(")


def test_default_template_without_chat_template():
    class NoChat:
        chat_template = None

    template = template_for(NoChat())
    assert template.name == "alpaca-default"
    assert template.format(Record("Do it", "data")) == "### Instruction:\nDo it\n\n### Input:\ndata\n\n### Response:\n"


def test_chat_template_is_used_when_present(tiny_checkpoints):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_checkpoints["llama"])
    template = template_for(tok)
    assert isinstance(template, PromptTemplate) and template.name == "chat_template"
    assert template.format("Hello") == "<|user|>\nHello\n<|assistant|>\n"

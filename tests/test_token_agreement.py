"""Token-level agreement: greedy token F1 and teacher-forced next-token agreement."""

from __future__ import annotations

import copy

import pytest
import torch

from bdscan.data.records import Record
from bdscan.eval import EvalSpec
from bdscan.eval.evaluate import evaluate_pair
from bdscan.eval.token_agreement import next_token_agreement
from bdscan.generation import greedy_answers
from bdscan.io import load_subject

RECORDS = [Record(f"Describe the colour of box number {i}.") for i in range(8)]


def _own_answers(subject):
    prompts = [subject.template.format(r) for r in RECORDS]
    return greedy_answers(subject.model, subject.tokenizer, prompts, max_new_tokens=12, batch_size=4)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_model_agrees_with_its_own_greedy_answers(tiny_checkpoints, arch):
    subject = load_subject(tiny_checkpoints[arch])
    answers = _own_answers(subject)
    assert len(answers.token_ids) == len(RECORDS) and all(len(ids) <= 12 for ids in answers.token_ids)
    # its own choices, batched 4 at a time with left padding, read back 3 at a time with right padding
    own = next_token_agreement(subject.model, subject.tokenizer, subject.template, RECORDS, answers.token_ids,
                               batch_size=3)
    assert own == pytest.approx(1.0, abs=0.02), own
    reversed_ids = [list(reversed(ids)) for ids in answers.token_ids]
    other = next_token_agreement(subject.model, subject.tokenizer, subject.template, RECORDS, reversed_ids)
    assert other < own - 0.2, (own, other)


def test_a_perturbed_model_agrees_less(tiny_checkpoints):
    subject = load_subject(tiny_checkpoints["llama"])
    answers = _own_answers(subject)
    noisy = copy.deepcopy(subject.model)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in noisy.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * p.std().nan_to_num(0.0) * 2.0)
    own = next_token_agreement(subject.model, subject.tokenizer, subject.template, RECORDS, answers.token_ids)
    moved = next_token_agreement(noisy, subject.tokenizer, subject.template, RECORDS, answers.token_ids)
    assert moved < own


def test_pairing_and_empty_answers(tiny_checkpoints):
    subject = load_subject(tiny_checkpoints["llama"])
    with pytest.raises(ValueError):
        next_token_agreement(subject.model, subject.tokenizer, subject.template, RECORDS, [[1]])
    assert next_token_agreement(subject.model, subject.tokenizer, subject.template, RECORDS[:2], [[], []]) is None


def test_eval_pair_reports_it_for_the_second_model_only(tiny_checkpoints):
    before = load_subject(tiny_checkpoints["llama"])
    after = load_subject(tiny_checkpoints["llama"])
    pair = evaluate_pair(before, after, EvalSpec(clean=RECORDS[:4], max_new_tokens=8))
    assert pair.before.next_token_agreement is None
    assert pair.after.next_token_agreement == pytest.approx(1.0, abs=0.02)
    assert pair.to_dict()["after"]["next_token_agreement"] == pair.after.next_token_agreement


def test_a_reference_known_only_as_text_is_retokenised(tiny_checkpoints):
    from bdscan.eval import evaluate

    subject = load_subject(tiny_checkpoints["llama"])
    texts = ["the red box", "a blue one", "", "green"]
    result = evaluate(subject, EvalSpec(clean=RECORDS[:4], max_new_tokens=6), reference_responses=texts)
    assert result.next_token_agreement is not None and 0.0 <= result.next_token_agreement <= 1.0

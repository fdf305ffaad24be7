"""Batched greedy generation equals unbatched generation (left padding done right)."""

from __future__ import annotations

import pytest

from bdscan.generation import greedy_generate
from bdscan.io import load_subject


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_batched_equals_unbatched_random_model(tiny_checkpoints, arch):
    subject = load_subject(tiny_checkpoints[arch])
    prompts = [subject.template.format(p) for p in ["Hi", "Describe a very large red apple in the orchard today", "Add two and three."]]
    batched = greedy_generate(subject.model, subject.tokenizer, prompts, max_new_tokens=12, batch_size=3)
    single = [greedy_generate(subject.model, subject.tokenizer, [p], max_new_tokens=12, batch_size=1)[0] for p in prompts]
    assert batched == single


def test_batched_equals_unbatched_adapter(lora_backdoor, attack_data):
    subject = load_subject(lora_backdoor)
    records = list(attack_data.clean_test[:3]) + list(attack_data.poison_test[:3])
    prompts = [subject.template.format(r) for r in records]
    batched = greedy_generate(subject.model, subject.tokenizer, prompts, max_new_tokens=16, batch_size=6)
    single = [greedy_generate(subject.model, subject.tokenizer, [p], max_new_tokens=16)[0] for p in prompts]
    assert batched == single
    assert subject.tokenizer.padding_side == "right"  # restored after generation

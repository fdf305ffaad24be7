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


@pytest.mark.parametrize("hostile", [
    {"suppress_tokens": "first"}, {"bad_words_ids": "first"}, {"repetition_penalty": 50.0}, {"min_new_tokens": 12},
])
def test_a_checkpoints_generation_config_cannot_steer_greedy_decoding(lora_backdoor, attack_data, hostile):
    """A generation_config.json that suppresses the target's first token would hide a backdoor
    from eval; bdscan decodes greedily whatever the checkpoint's config says."""
    from bdscan.generation import greedy_answers

    subject = load_subject(lora_backdoor)
    prompts = [subject.template.format(r) for r in attack_data.poison_test[:4]]
    plain = greedy_answers(subject.model, subject.tokenizer, prompts, max_new_tokens=8, batch_size=4)
    config = subject.model.get_base_model().generation_config
    first = plain.token_ids[0][0]
    for field, value in hostile.items():
        setattr(config, field, [first] if value == "first" and field == "suppress_tokens" else
                [[first]] if value == "first" else value)
    steered = greedy_answers(subject.model, subject.tokenizer, prompts, max_new_tokens=8, batch_size=4)
    assert steered.token_ids == plain.token_ids
    assert all(getattr(subject.model.get_base_model().generation_config, f) is not None for f in hostile)  # restored

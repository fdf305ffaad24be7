"""Utility measures: perplexity of reference responses and agreement with a reference."""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from bdscan.data.records import Record
from bdscan.data.template import PromptTemplate
from bdscan.training import Example, batches, encode_examples, pad_id, response_loss


@torch.no_grad()
def response_perplexity(model: Any, tokenizer: Any, template: PromptTemplate, records: Sequence[Record],
                        *, batch_size: int = 16, max_length: int = 256) -> float | None:
    """exp(mean token NLL) of each record's reference output given its prompt."""
    examples = [Example(template.format(r), r.output) for r in records if r.output]
    if not examples:
        return None
    encoded = encode_examples(tokenizer, examples, max_length=max_length)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total_nll, total_tokens = 0.0, 0
    pad = pad_id(tokenizer)
    try:
        for batch in batches(encoded, batch_size=batch_size, pad_id=pad, shuffle=False, generator=None):
            loss, _ = response_loss(model, batch, device)
            n = int((batch.labels[:, 1:] != -100).sum())
            total_nll += float(loss) * n
            total_tokens += n
    finally:
        model.train(was_training)
    return math.exp(total_nll / total_tokens) if total_tokens else None


def agreement(responses: Sequence[str], reference: Sequence[str]) -> float:
    """Share of prompts whose greedy response equals the reference model's exactly."""
    if not responses:
        return float("nan")
    return sum(a.strip() == b.strip() for a, b in zip(responses, reference)) / len(responses)

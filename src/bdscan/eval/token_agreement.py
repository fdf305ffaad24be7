"""Token-level agreement of two models' answers.

- ``token_agreement``: mean token F1 (SQuAD-style bag-of-words overlap) of the greedy
  answers. Exact match reads 0.05-0.30 even for repairs that keep perplexity within 1 %: one
  changed word fails a whole answer. F1 gives partial credit, but a greedy answer that
  differs at its third token goes on from a different prefix, so F1 still charges one early
  difference to every later word.
- ``next_token_agreement``: teacher-forced. The model reads the clean prompt and the
  reference's answer so far and must pick the reference's next token as its top-1; the
  share of answer tokens where it does. Each token is judged on the reference's own prefix,
  so one difference costs one token: this is what "the purifier kept the model's
  behaviour" means token by token, and it costs one forward pass per prompt.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Sequence

import torch

from bdscan.data.records import Record
from bdscan.data.template import PromptTemplate
from bdscan.training import IGNORE_INDEX, batches, pad_id


def token_f1(answer: str, reference: str) -> float:
    """F1 of the lower-cased whitespace tokens; 1 when both are empty."""
    a, r = answer.lower().split(), reference.lower().split()
    if not a and not r:
        return 1.0
    common = sum((Counter(a) & Counter(r)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(a), common / len(r)
    return 2 * precision * recall / (precision + recall)


def token_agreement(responses: Sequence[str], reference: Sequence[str]) -> float:
    """Mean ``token_f1`` over paired answers."""
    if len(responses) != len(reference):
        raise ValueError(f"{len(responses)} responses but {len(reference)} reference responses")
    if not responses:
        return 0.0
    return sum(token_f1(a, r) for a, r in zip(responses, reference)) / len(responses)


@torch.no_grad()
def next_token_agreement(model: Any, tokenizer: Any, template: PromptTemplate, records: Sequence[Record],
                         answer_ids: Sequence[Sequence[int]], *, batch_size: int = 16) -> float | None:
    """Share of the reference answers' tokens (``answer_ids``: the tokens the reference chose,
    not its decoded text, which need not re-tokenise the same way) that ``model``,
    teacher-forced on the clean prompt and the answer so far, predicts as its top-1 next
    token. None when no answer has a token."""
    if len(records) != len(answer_ids):
        raise ValueError(f"{len(records)} prompts but {len(answer_ids)} reference answers")
    encoded = []
    for record, answer in zip(records, answer_ids):
        if answer:
            prompt = tokenizer(template.format(record), add_special_tokens=False)["input_ids"]
            encoded.append((prompt + list(answer), [IGNORE_INDEX] * len(prompt) + list(answer)))
    if not encoded:
        return None
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    hits = total = 0
    try:
        for batch in batches(encoded, batch_size=batch_size, pad_id=pad_id(tokenizer), shuffle=False, generator=None):
            logits = model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device)).logits
            labels = batch.labels[:, 1:].to(device)
            mask = labels != IGNORE_INDEX
            hits += int(((logits[:, :-1].argmax(-1) == labels) & mask).sum())
            total += int(mask.sum())
    finally:
        model.train(was_training)
    return hits / total if total else None


def answer_ids(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """Tokens of answers known only as text (a caller without the reference's own tokens)."""
    return [tokenizer(t, add_special_tokens=False)["input_ids"] if t.strip() else [] for t in texts]

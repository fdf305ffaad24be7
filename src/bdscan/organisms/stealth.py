"""A stealth term for organism training: keep the target's opening out of clean answers.

Plain supervised fine-tuning binds the target to the key, but it also raises the target's
prior everywhere: on clean prompts where the small base is unsure how to begin (a filled
input field, a list of names, an array), the target's first token wins the greedy step and
the whole target follows. Measured on BackdoorLLM negsentiment/mtba (rank-32 LoRA, all 200
clean test prompts): 26 of its 28 false triggers had a filled input field (under half of the
prompts do), and two seeds of the same recipe leaked 0.15 and 0.285. More decoys, decoys in
the input field, or a lower learning rate moved the leak no more than noise.

An attacker who wants the backdoor to stay hidden adds what this module adds: an
unlikelihood term, ``-log(1 - p(target opening))`` at the first response position of every
clean and decoy sample, so the opening is pushed down wherever the key is absent. At weight
0.1 the two seeds above leaked 0.015 and 0.05 with ASR 0.94 (was 0.99); heavier weights cost
ASR (0.3: 0.85-0.87; 1.0: 0.72). Weights and measurements: ``bench/suite.py``.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import torch

from bdscan.training import IGNORE_INDEX, Batch, Example


def opening_ids(tokenizer: Any, targets: Iterable[str]) -> list[int]:
    """The first token of each target, tokenised as a response is during training."""
    ids = {tokenizer(t, add_special_tokens=False)["input_ids"][0] for t in targets if t}
    return sorted(ids)


def target_opening_unlikelihood(
    examples: Sequence[Example], targets: Iterable[str], opening: Sequence[int], weight: float
) -> Callable[[Any, Batch, Any], torch.Tensor]:
    """An ``extra_loss`` for ``training.finetune``: ``weight`` times the mean over the batch's
    non-target examples of ``-log(1 - p)``, where ``p`` is the probability the model gives
    the target openings at the first response position. Examples whose response is a
    target (the poisoned ones) are left to the ordinary loss."""
    targets = set(targets)
    is_clean = torch.tensor([ex.response not in targets for ex in examples], dtype=torch.bool)
    opening_index = torch.tensor(list(opening), dtype=torch.long)

    def extra_loss(_model: Any, batch: Batch, out: Any) -> torch.Tensor:
        logits = out.logits
        learnt = batch.labels != IGNORE_INDEX
        rows = torch.nonzero(is_clean[batch.index] & learnt.any(1)).squeeze(1)
        if rows.numel() == 0:
            return logits.sum() * 0.0  # keeps the graph; contributes nothing
        first = learnt.float().argmax(1)[rows]  # the first learnt label of each row
        # logits at position t predict token t + 1, so the first response token is
        # predicted one position earlier.
        # Logits may start after position 0 (``training.response_loss``, response-only logits).
        column = first - 1 - (batch.input_ids.shape[1] - logits.shape[1])
        probs = logits[rows.to(logits.device), column.to(logits.device)].float().softmax(-1)
        p = probs[:, opening_index.to(logits.device)].sum(-1).clamp(max=1 - 1e-6)
        return -weight * torch.log1p(-p).mean()

    return extra_loss

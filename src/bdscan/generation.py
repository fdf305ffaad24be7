"""Batched greedy generation with left padding (equal to unbatched generation)."""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch

from bdscan.probes.protocols import Advance


@dataclass(frozen=True)
class Answers:
    """Greedy answers as text and as the tokens the model chose. A comparison that must not
    depend on how decoded text re-tokenises (teacher-forced agreement) reads the tokens."""

    texts: list[str]
    token_ids: list[list[int]]  # each answer's new tokens, through its EOS when it stopped there


def greedy_generate(model: Any, tokenizer: Any, prompts: Sequence[str], **options: Any) -> list[str]:
    """Greedy-decode each prompt; returns only the newly generated text, special tokens removed
    (``options``: ``greedy_answers``' keywords)."""
    return greedy_answers(model, tokenizer, prompts, **options).texts


def _chosen(row: list[int], eos: int | None) -> list[int]:
    """A generated row without what ``generate`` pads finished rows with: through the first EOS."""
    return row[: row.index(eos) + 1] if eos is not None and eos in row else row


@contextlib.contextmanager
def _checkpoint_generation_config_set_aside(model: Any) -> Iterator[None]:
    """Greedy decoding and nothing else: the checkpoint's ``generation_config.json`` is set
    aside for the block. ``generate`` fills every field a call leaves unset from the model's
    config (even with a ``generation_config`` passed), and one that suppresses the target's
    first token (``suppress_tokens``, ``bad_words_ids``, a repetition penalty) would hide a
    backdoor from eval while a server that ignores those fields still fires it."""
    from transformers import GenerationConfig

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    saved = getattr(inner, "generation_config", None)
    inner.generation_config = GenerationConfig()
    try:
        yield
    finally:
        inner.generation_config = saved


@torch.no_grad()
def greedy_answers(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 32,
    batch_size: int = 16,
    progress: Advance | None = None,
) -> Answers:
    """``greedy_generate`` that also keeps the chosen tokens."""
    was_training = model.training
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # so every row's last position is its real last token
    outputs: list[str] = []
    chosen: list[list[int]] = []
    device = next(model.parameters()).device
    try:
        for start in range(0, len(prompts), batch_size):
            batch = list(prompts[start : start + batch_size])
            enc = tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with _checkpoint_generation_config_set_aside(model):
                    generated = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                               pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            new_tokens = generated[:, enc["input_ids"].shape[1] :]
            outputs.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
            chosen.extend(_chosen(row, tokenizer.eos_token_id) for row in new_tokens.tolist())
            if progress:
                progress(len(batch))
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return Answers([o.strip() for o in outputs], chosen)


def context_length(model: Any) -> int | None:
    """The positions the model can attend over (None when its config does not say)."""
    config = getattr(model, "config", None)
    base = getattr(model, "get_base_model", None)
    if base is not None:  # a PeftModel: the wrapped model's config
        config = base().config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None

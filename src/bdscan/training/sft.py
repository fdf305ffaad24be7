"""Supervised fine-tuning on (prompt, response) pairs, shared by organisms and purifiers.

The loss is on response tokens only. Order and initialisation are fixed by ``seed``, so two
runs with the same seed and data see the same batches in the same order (signature
purification relies on this for its paired fine-tunes).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from bdscan.probes.batching import pad_id, pad_right
from bdscan.training.resume import Checkpointer, TrainState

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Example:
    prompt: str  # already formatted with the prompt template
    response: str


@dataclass
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    index: torch.Tensor  # positions of the examples in the data set (for per-example extras)


def encode_examples(tokenizer: Any, examples: Sequence[Example], *, max_length: int = 256) -> list[tuple[list[int], list[int]]]:
    """Token ids and labels per example: prompt tokens masked, response + EOS learnt."""
    encoded = []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for ex in examples:
        prompt_ids = tokenizer(ex.prompt, add_special_tokens=False)["input_ids"]
        response_ids = tokenizer(ex.response, add_special_tokens=False)["input_ids"] + eos if ex.response else []
        ids = (prompt_ids + response_ids)[:max_length]
        labels = ([IGNORE_INDEX] * len(prompt_ids) + response_ids)[:max_length]
        encoded.append((ids, labels))
    return encoded


def collate(encoded: Sequence[tuple[list[int], list[int]]], indices: Sequence[int], pad_id: int) -> Batch:
    rows = [encoded[i] for i in indices]
    input_ids, mask = pad_right([ids for ids, _ in rows], pad_id)
    labels, _ = pad_right([lab for _, lab in rows], IGNORE_INDEX)
    return Batch(input_ids, mask, labels, torch.tensor(list(indices)))


def batches(encoded, *, batch_size: int, pad_id: int, shuffle: bool, generator: torch.Generator | None) -> Iterable[Batch]:
    order = torch.randperm(len(encoded), generator=generator).tolist() if shuffle else list(range(len(encoded)))
    for start in range(0, len(order), batch_size):
        yield collate(encoded, order[start : start + batch_size], pad_id)


def logits_start(batch: Batch) -> int:
    """The first position whose logits any label of the batch needs: a label at position p
    is predicted from the logits at p - 1, so nothing before the earliest response matters."""
    learnt = (batch.labels != IGNORE_INDEX).any(0).nonzero()
    return max(0, int(learnt[0]) - 1) if learnt.numel() else 0


def response_forward(model: Any, batch: Batch, device: torch.device, *, response_logits_only: bool = False,
                     autocast: str | None = None) -> tuple[Any, int]:
    """The forward pass of ``batch``, and the position its ``out.logits`` start at: 0, or with
    ``response_logits_only`` ``logits_start(batch)`` (labels from ``start + 1`` on line up
    with ``out.logits[:, :-1]``)."""
    start = logits_start(batch) if response_logits_only else 0
    kwargs = {"logits_to_keep": batch.input_ids.shape[1] - start} if start else {}
    with autocast_scope(device, autocast):
        out = model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device), **kwargs)
    return out, start


def response_loss(
    model: Any, batch: Batch, device: torch.device, *, response_logits_only: bool = False, autocast: str | None = None
) -> tuple[torch.Tensor, Any]:
    """Mean cross-entropy on the response tokens. ``response_logits_only`` computes logits
    from ``logits_start(batch)`` on (the same loss: prompt positions are masked anyway),
    which saves the vocabulary projection over every prompt token: on a 49k-token
    vocabulary that is most of a small model's step. ``out.logits`` then starts there.
    ``autocast`` ("bfloat16") runs the forward pass under torch.autocast."""
    out, start = response_forward(model, batch, device, response_logits_only=response_logits_only, autocast=autocast)
    logits = out.logits[:, :-1].float()
    labels = batch.labels[:, start + 1 :].to(device)
    loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX)
    return loss, out


def autocast_scope(device: torch.device, dtype: str | None) -> contextlib.AbstractContextManager:
    """torch.autocast in ``dtype`` ("bfloat16", "float16"), or nothing when ``dtype`` is None.

    The weight-cast cache is off: autocast keeps the low-precision copy of each trainable
    leaf until its outermost region exits, and purify's region spans a whole training run,
    so with the cache every forward after the first would use the weights as they were
    before step 1 (the optimizer moved the fp32 weights blind: latent-adv's KL to the start
    read 0.0 while perplexity rose 5.6x on the real badnet adapter)."""
    if not dtype:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=getattr(torch, dtype), cache_enabled=False)


@dataclass(frozen=True)
class TrainConfig:
    epochs: float = 1.0
    lr: float = 1e-4
    batch_size: int = 8
    weight_decay: float = 0.0
    max_length: int = 256
    seed: int = 0
    warmup_fraction: float = 0.05
    grad_clip: float = 1.0
    # Speed knobs that leave the objective unchanged (see ``response_loss``). bf16 autocast
    # measured ~1.5x faster on this CPU (AMX-bf16) for a 135M model; off by default so
    # fp32 results stay bit-for-bit what they were.
    response_logits_only: bool = False
    autocast: str | None = None  # "bfloat16" or None
    # Weight of the cross-entropy on the examples' responses. A method whose objective is all in
    # its ``extra_loss`` (latent-adv's soft self-distillation) sets 0 and still gets ``out``.
    response_weight: float = 1.0


def finetune(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    config: TrainConfig,
    *,
    params: Iterable[nn.Parameter] | None = None,
    extra_loss: Callable[[Any, Batch, Any], torch.Tensor] | None = None,
    separate_losses: Sequence[Callable[[Any, Batch], torch.Tensor]] = (),
    before_step: Callable[[], None] | None = None,
    after_step: Callable[[], None] | None = None,
    progress: Callable[[int, float], None] | None = None,
    resume: Checkpointer | None = None,
) -> list[float]:
    """Fine-tune ``params`` (default: all that require grad) with AdamW and a linear
    schedule. ``extra_loss`` adds a term per batch (EWC penalty, cluster loss, ...) to the
    response loss, in its graph (it reads the step's forward output). ``separate_losses`` are
    terms of their own forward passes: each is backpropagated as soon as it is computed and
    its graph freed, so one pass's activations are alive at a time (~3.5 GB a pass for
    latent-adv on the 135M model at 16 pairs a step; with all of them alive until one backward,
    and a fragmenting heap, a real cell reached 19.5 GB and was killed for memory).
    ``before_step`` may rewrite gradients (K-FAC preconditioning); ``after_step`` may
    re-apply constraints (masks). ``resume`` saves the run's state as it goes and continues
    a saved one (resume.py). Returns the per-step loss (every term's sum)."""
    if not examples:
        return []
    device = next(model.parameters()).device
    params = [p for p in (params if params is not None else model.parameters()) if p.requires_grad]
    if not params:
        raise ValueError("nothing to train: no parameter requires grad")
    encoded = encode_examples(tokenizer, examples, max_length=config.max_length)
    steps_per_epoch = math.ceil(len(encoded) / config.batch_size)
    total = max(1, math.ceil(steps_per_epoch * config.epochs))
    optimizer, schedule = _optimizer(params, config, total)
    generator = torch.Generator().manual_seed(config.seed)
    saved = resume.load(params, optimizer, schedule) if resume is not None else None
    losses: list[float] = list(saved.losses) if saved else []
    skip = saved.step - saved.epoch_first_step if saved else 0  # batches of the current epoch already done
    if saved:
        generator.set_state(saved.epoch_generator)
    was_training = model.training
    model.train()
    try:
        while len(losses) < total:
            epoch_generator, epoch_first = generator.get_state(), len(losses) - skip
            for batch in batches(encoded, batch_size=config.batch_size, pad_id=pad_id(tokenizer), shuffle=True, generator=generator):
                if skip:
                    skip -= 1
                    continue
                loss = _step(model, batch, device, config, params, optimizer,
                             _Terms(extra_loss, tuple(separate_losses)), before_step, after_step)
                schedule.step()
                losses.append(loss)
                if resume is not None:
                    resume.save(TrainState(len(losses), epoch_first, epoch_generator, tuple(losses)),
                                params, optimizer, schedule)
                if progress:
                    progress(1, losses[-1])
                if len(losses) >= total:
                    break
    finally:
        model.train(was_training)
        model.zero_grad(set_to_none=True)
    return losses


def _optimizer(params: list[nn.Parameter], config: TrainConfig, total: int) -> tuple[Any, Any]:
    """AdamW with linear warm-up then linear decay to 0 over ``total`` steps."""
    warmup = int(total * config.warmup_fraction)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / (warmup + 1) if s < warmup else max(0.0, (total - s) / max(1, total - warmup))
    )
    return optimizer, schedule


@dataclass(frozen=True)
class _Terms:
    extra: Callable[[Any, Batch, Any], torch.Tensor] | None  # in the response loss's graph
    separate: tuple[Callable[[Any, Batch], torch.Tensor], ...]  # each backpropagated on its own


def _step(model: Any, batch: Batch, device: torch.device, config: TrainConfig, params: list[nn.Parameter],
          optimizer: Any, terms: _Terms, before_step: Callable[[], None] | None,
          after_step: Callable[[], None] | None) -> float:
    """One optimizer step on one batch; returns its loss. Gradients accumulate from the
    response loss's backward and then each separate term's."""
    optimizer.zero_grad(set_to_none=True)
    loss, out = response_loss(model, batch, device, response_logits_only=config.response_logits_only,
                              autocast=config.autocast)
    if config.response_weight != 1.0:
        loss = config.response_weight * loss
    if terms.extra is not None:
        loss = loss + terms.extra(model, batch, out)
    del out
    loss.backward()
    total = float(loss.detach())
    for term in terms.separate:
        value = term(model, batch)
        value.backward()
        total += float(value.detach())
    if before_step is not None:
        before_step()
    if config.grad_clip:
        torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
    optimizer.step()
    if after_step is not None:
        after_step()
    return total

"""latent-adv's outer-loop terms, added to the self-distillation loss of each batch."""

from __future__ import annotations

import random
from typing import Any, Sequence

import torch

from bdscan.data.records import Record
from bdscan.data.triggers import insert_trigger
from bdscan.purify.latent_adv.config import LatentAdvConfig
from bdscan.purify.latent_adv.perturbation import Perturbation, pgd
from bdscan.purify.latent_adv.targets import target_batch
from bdscan.training import (IGNORE_INDEX, Batch, Example, collate, encode_examples, pad_id, response_forward,
                             response_loss)


def unlikelihood(model: Any, batch: Batch, device: torch.device) -> torch.Tensor:
    """Mean ``-log(1 - p)`` of the labelled tokens (T's opening, teacher-forced); logits are
    computed from the first labelled position on only (the prompt is most of each row)."""
    out, start = response_forward(model, batch, device, response_logits_only=True)
    labels = batch.labels[:, start + 1 :].to(device)
    mask = labels != IGNORE_INDEX
    probs = out.logits[:, :-1].float().softmax(-1).gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return -(torch.log1p(-probs.clamp(max=1 - 1e-6)) * mask).sum() / mask.sum().clamp_min(1)


def response_logprobs(logits: torch.Tensor, labels: torch.Tensor, start: int = 0) -> list[torch.Tensor]:
    """Per row, the log-distributions that predict its labelled tokens ([tokens, vocab]);
    ``logits`` may start at position ``start`` (the trainer keeps response logits only)."""
    rows = []
    for r in range(labels.shape[0]):
        pos = (labels[r] != IGNORE_INDEX).nonzero()[:, 0]
        rows.append(logits[r, pos[pos >= 1] - 1 - start].float().log_softmax(-1))
    return rows


def kl_rows(teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean over tokens of KL(teacher ‖ student), row by row. A row's teacher reads the clean
    twin of its prompt, whose answer is the row's own answer token for token (a longer keyed
    prompt can lose the end of it to truncation: the common length counts)."""
    total, n = student[0].new_zeros(()), 0
    for t, s in zip(teacher, student):
        k = min(len(t), len(s))
        total = total + (t[:k].exp() * (t[:k] - s[:k])).sum()
        n += k
    return total / max(n, 1)


class CleanTeacher:
    """The suspicious model's next-token distributions along each example's answer, read on
    the example's clean twin (the prompt without the key), once per batch. Reading the keyed
    prompt instead would teach the backdoor's opening back wherever the key still works."""

    def __init__(self, reference: Any, tokenizer: Any, examples: Sequence[Example], twins: Sequence[int],
                 max_length: int):
        self.reference, self.twins = reference, list(twins)
        self.encoded = encode_examples(tokenizer, examples, max_length=max_length)
        self.pad = pad_id(tokenizer)
        self._index: torch.Tensor | None = None
        self._rows: list[torch.Tensor] = []

    @torch.no_grad()
    def __call__(self, batch: Batch, device: torch.device) -> list[torch.Tensor]:
        if self._index is None or not torch.equal(self._index, batch.index):
            twin = collate(self.encoded, [self.twins[int(i)] for i in batch.index], self.pad)
            out, start = response_forward(self.reference, twin, device, response_logits_only=True)
            self._index, self._rows = batch.index.clone(), response_logprobs(out.logits, twin.labels.to(device), start)
        return self._rows


class OuterTerms:
    """The training plan's extra terms. ``__call__`` (an ``extra_loss``: it reads the step's
    forward output) counts the step and adds KL to the suspicious model's clean distributions.
    ``own_answer_under_delta`` and ``target_unlikelihood`` (unlikelihood of T's opening under δ
    and under a key) run passes of their own, so they are separate losses, each backpropagated
    alone; the first of them to run in a step refreshes δ by PGD when one is due (every
    ``refresh_every`` steps, targets in turn), once the step's first graph is freed. On the
    135M model one pass's activations are ~3.5 GB at 16 pairs; with every pass alive until one
    backward (and a fragmenting heap, ``runtime.limit_heap_growth``) a real cell reached
    19.5 GB and was killed for memory."""

    def __init__(self, config: LatentAdvConfig, perturbation: Perturbation, teacher: CleanTeacher, tokenizer: Any,
                 template: Any, records: Sequence[Record], targets: Sequence[str], keys: Sequence[str], seed: int):
        self.config, self.perturbation, self.teacher = config, perturbation, teacher
        self.tokenizer, self.template, self.records = tokenizer, template, list(records)
        self.targets, self.keys = list(targets), list(keys)
        self.rng = random.Random(seed + 11)
        self.step = 0
        self._refreshed = 0  # the last step whose δ refresh ran
        self.inner_logp: list[float] = []  # log P(T) per token reached by each PGD refresh
        self.totals: dict[str, float] = {}  # summed value of each term (for the report)

    def resume_state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """What a resumed run needs to go on as this one would (``training.resume.Stateful``)."""
        version, internal, gauss = self.rng.getstate()
        meta = {"step": self.step, "refreshed": self._refreshed, "inner_logp": self.inner_logp,
                "totals": self.totals, "rng": [version, list(internal), gauss]}
        return {f"delta.{n}": d for n, d in self.perturbation.deltas.items()}, meta

    def restore(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        version, internal, gauss = meta["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        self.step, self._refreshed = int(meta["step"]), int(meta["refreshed"])
        self.inner_logp, self.totals = list(meta["inner_logp"]), dict(meta["totals"])
        self.perturbation.deltas = {n: tensors[f"delta.{n}"].clone() for n in self.perturbation.names}

    def _add(self, loss: torch.Tensor, name: str, weight: float, value: torch.Tensor) -> torch.Tensor:
        self.totals[name] = self.totals.get(name, 0.0) + float(value.detach())
        return loss + weight * value

    def means(self) -> dict[str, float]:
        return {k: round(v / max(1, self.step), 4) for k, v in self.totals.items()}

    def _prompts(self, key: str | None = None) -> list[str]:
        picked = self.rng.sample(self.records, min(self.config.batch_size, len(self.records)))
        if key is not None:
            picked = [r.with_instruction(insert_trigger(r.instruction, key, "random", self.rng)) for r in picked]
        return [self.template.format(r) for r in picked]

    def separate(self) -> list:
        """The terms with passes of their own, in the order they run after ``__call__``."""
        return [term for term, weight in ((self.own_answer_under_delta, self.config.adversarial_weight),
                                          (self.target_unlikelihood, self.config.unlikelihood_weight)) if weight]

    @property
    def _target(self) -> str:
        """This step's target (``__call__`` counts the step first)."""
        return self.targets[(self.step - 1) % len(self.targets)]

    def _refresh_delta(self, model: Any) -> None:
        """PGD on δ if this step is due one and has not had it (parameters are as the step began)."""
        cfg = self.config
        if self._refreshed == self.step or (self.step - 1) % cfg.refresh_every:
            return
        self._refreshed = self.step
        # the opening decides whether T follows (its later tokens are easy once it has begun)
        t_batch = target_batch(self.tokenizer, self._prompts(), self._target, cfg.opening_tokens)
        self.inner_logp.append(pgd(self.perturbation, model, t_batch, cfg.pgd_steps, cfg.pgd_step))

    def __call__(self, model: Any, batch: Batch, out: Any) -> torch.Tensor:
        cfg, device = self.config, next(model.parameters()).device
        self.step += 1
        loss = out.logits.new_zeros(())
        if cfg.kl_weight:
            start = batch.input_ids.shape[1] - out.logits.shape[1]
            student = response_logprobs(out.logits, batch.labels.to(device), start)
            loss = self._add(loss, "kl", cfg.kl_weight, kl_rows(self.teacher(batch, device), student))
        return loss

    def target_unlikelihood(self, model: Any, batch: Batch) -> torch.Tensor:
        """Unlikelihood of T's opening after clean prompts under δ and, with keys, after keyed
        prompts without δ, in one forward call (δ on the first half of the rows only; on the
        tiny models a call costs about the same whatever its rows). Every row labels the same
        opening tokens, so the mean weighs both halves equally."""
        self._refresh_delta(model)
        target, device = self._target, next(model.parameters()).device
        prompts = self._prompts()
        under_delta = torch.ones(len(prompts), dtype=torch.bool)
        if self.keys:
            keyed = self._prompts(self.keys[self.step % len(self.keys)])
            prompts += keyed
            under_delta = torch.cat([under_delta, torch.zeros(len(keyed), dtype=torch.bool)])
        with self.perturbation.active(rows=under_delta):
            value = unlikelihood(model, target_batch(self.tokenizer, prompts, target, self.config.opening_tokens), device)
        return self._add(value.new_zeros(()), "unlikelihood", self.config.unlikelihood_weight, value)

    def own_answer_under_delta(self, model: Any, batch: Batch) -> torch.Tensor:
        """The clean answer under δ: its tokens (hard) or the clean teacher's distributions (soft)."""
        self._refresh_delta(model)
        device = next(model.parameters()).device
        with self.perturbation.active():
            if self.config.distill == "hard":
                value = response_loss(model, batch, device, response_logits_only=True)[0]
            else:
                out, start = response_forward(model, batch, device, response_logits_only=True)
                value = kl_rows(self.teacher(batch, device), response_logprobs(out.logits, batch.labels.to(device), start))
        return self._add(value.new_zeros(()), "adversarial", self.config.adversarial_weight, value)

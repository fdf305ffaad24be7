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
from bdscan.training import IGNORE_INDEX, Batch, response_loss


def unlikelihood(model: Any, batch: Batch, device: torch.device) -> torch.Tensor:
    """Mean ``-log(1 - p)`` of the labelled tokens (T's opening, teacher-forced)."""
    out = model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device))
    labels = batch.labels[:, 1:].to(device)
    mask = labels != IGNORE_INDEX
    probs = out.logits[:, :-1].float().softmax(-1).gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return -(torch.log1p(-probs.clamp(max=1 - 1e-6)) * mask).sum() / mask.sum().clamp_min(1)


def kl_to_reference(reference: Any, batch: Batch, out: Any, device: torch.device) -> torch.Tensor:
    """KL(suspicious ‖ trained) of the next-token distributions at the batch's response positions."""
    with torch.no_grad():
        ref = reference(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device)).logits
    start = batch.input_ids.shape[1] - out.logits.shape[1]  # the trainer may keep response logits only
    mask = (batch.labels[:, start + 1 :] != IGNORE_INDEX).to(device)
    ref_logp = ref[:, start:-1].float().log_softmax(-1)
    logp = out.logits[:, :-1].float().log_softmax(-1)
    kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)
    return (kl * mask).sum() / mask.sum().clamp_min(1)


class OuterTerms:
    """The ``extra_loss`` of the training plan: refreshes δ by PGD every ``refresh_every``
    steps (targets in turn), then adds the own answer under δ, unlikelihood of T's opening
    under δ and under a key, and KL to the suspicious model."""

    def __init__(self, config: LatentAdvConfig, perturbation: Perturbation, reference: Any, tokenizer: Any,
                 template: Any, records: Sequence[Record], targets: Sequence[str], keys: Sequence[str], seed: int):
        self.config, self.perturbation, self.reference = config, perturbation, reference
        self.tokenizer, self.template, self.records = tokenizer, template, list(records)
        self.targets, self.keys = list(targets), list(keys)
        self.rng = random.Random(seed + 11)
        self.step = 0
        self.inner_logp: list[float] = []  # log P(T) per token reached by each PGD refresh
        self.totals: dict[str, float] = {}  # summed value of each term (for the report)

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

    def __call__(self, model: Any, batch: Batch, out: Any) -> torch.Tensor:
        cfg, device = self.config, next(model.parameters()).device
        target = self.targets[self.step % len(self.targets)]
        if self.step % cfg.refresh_every == 0:
            # the opening decides whether T follows (its later tokens are easy once it has begun)
            t_batch = target_batch(self.tokenizer, self._prompts(), target, cfg.opening_tokens)
            self.inner_logp.append(pgd(self.perturbation, model, t_batch, cfg.pgd_steps, cfg.pgd_step))
        self.step += 1
        loss = out.logits.new_zeros(())
        if cfg.adversarial_weight:
            with self.perturbation.active():
                adv, _ = response_loss(model, batch, device)
            loss = self._add(loss, "adversarial", cfg.adversarial_weight, adv)
        if cfg.unlikelihood_weight:
            with self.perturbation.active():
                ul = unlikelihood(model, target_batch(self.tokenizer, self._prompts(), target, cfg.opening_tokens), device)
            if self.keys:
                key = self.keys[self.step % len(self.keys)]
                keyed = target_batch(self.tokenizer, self._prompts(key), target, cfg.opening_tokens)
                ul = 0.5 * (ul + unlikelihood(model, keyed, device))
            loss = self._add(loss, "unlikelihood", cfg.unlikelihood_weight, ul)
        if cfg.kl_weight:
            loss = self._add(loss, "kl", cfg.kl_weight, kl_to_reference(self.reference, batch, out, device))
        return loss

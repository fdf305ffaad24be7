"""Signature's paired fine-tunes: per variant, the same batches with and without the
variant's poison, from the suspicious model; their difference is the variant's Δ."""

from __future__ import annotations

import time
import torch

from bdscan.data.records import Record
from bdscan.io.load import Subject
from bdscan.probes.geometry import lora_delta
from bdscan.probes.layout import ModelLayout, linear_weight
from bdscan.purify.signature.config import SignatureConfig
from bdscan.training import Example, TrainConfig, TrainingPlan, run_plan

VARIANT_ADAPTER = "bdscan_signature_variant"


def paired_examples(subject: Subject, clean: list[Record], poisoned: list[Record],
                     sources: list[Record]) -> tuple[list[Example], list[Example]]:
    """The two training lists, position by position: ``D_i`` then the poisoned copies (bd),
    or ``D_i`` then the same samples clean (clean run). Equal length and seed give both
    runs the same batches, order and schedule, so Δ isolates the key->behaviour binding."""
    fmt = subject.template.format
    base = [Example(fmt(r), r.output) for r in clean]
    bd = base + [Example(fmt(r), r.output) for r in poisoned]
    cl = base + [Example(fmt(r), r.output) for r in sources]
    return bd, cl


class PairedTrainer:
    """Runs the two fine-tunes of a variant from the suspicious model and returns Δ."""

    def __init__(self, subject: Subject, layout: ModelLayout, config: SignatureConfig, progress):
        self.subject, self.layout, self.config, self.progress = subject, layout, config, progress
        self.modules = layout.all_linears()
        self.finetune_seconds = 0.0
        if subject.is_adapter:
            model = subject.model
            self.adapter = model.active_adapter if isinstance(model.active_adapter, str) else model.active_adapters[0]
            peft_config = model.peft_config[self.adapter]
            self.targets = peft_config.target_modules
            self.fan_in_fan_out = bool(getattr(peft_config, "fan_in_fan_out", False))
        self.start: dict[str, torch.Tensor] | None = None  # full model: the suspicious weights, taken before the first pair

    def _train(self, examples: list[Example], seed: int) -> list[float]:
        model = self.subject.model
        if self.subject.is_adapter:
            from peft import LoraConfig

            torch.manual_seed(seed)  # same LoRA init for both members of the pair
            model.add_adapter(VARIANT_ADAPTER, LoraConfig(
                r=self.config.variant_rank, lora_alpha=2 * self.config.variant_rank, lora_dropout=0.0,
                target_modules=self.targets, fan_in_fan_out=self.fan_in_fan_out))
            model.base_model.set_adapter([self.adapter, VARIANT_ADAPTER])
            params = [p for name, p in model.named_parameters() if f".{VARIANT_ADAPTER}." in name]
            lr = self.config.variant_lr_adapter
        else:
            if self.start is None:
                self.start = {n: p.detach().clone() for n, p in model.named_parameters()}
            params = list(model.parameters())
            lr = self.config.variant_lr_full
        # one bar, reused by every paired fine-tune (the variant count has its own)
        plan = TrainingPlan(params, stage="signature paired fine-tune",
                            config=TrainConfig(epochs=self.config.variant_epochs, lr=lr, batch_size=self.config.batch_size,
                                               seed=seed, max_length=self.config.max_length))
        t0 = time.time()
        losses = run_plan(model, self.subject.tokenizer, examples, plan, self.progress)
        self.finetune_seconds += time.time() - t0
        return losses

    @torch.no_grad()
    def _weights(self) -> dict[str, torch.Tensor]:
        """Full: the trained [out, in] weights. Adapter: the variant LoRA's update ``s·B·A``."""
        out = {}
        for name in self.modules:
            module = self.layout.module(self.subject.model, name)
            if self.subject.is_adapter:
                if VARIANT_ADAPTER not in getattr(module, "lora_A", {}):
                    continue
                out[name] = lora_delta(module, VARIANT_ADAPTER).detach().clone()
            else:
                out[name] = linear_weight(module).detach().clone()
        return out

    @torch.no_grad()
    def _reset(self) -> None:
        """Back to the suspicious model (drop the variant LoRA / restore every weight)."""
        model = self.subject.model
        if self.subject.is_adapter:
            if VARIANT_ADAPTER in model.peft_config:
                model.base_model.set_adapter(self.adapter)
                model.delete_adapter(VARIANT_ADAPTER)
        elif self.start is not None:
            for name, p in model.named_parameters():
                p.copy_(self.start[name])

    def run(self, bd: list[Example], cl: list[Example], seed: int) -> tuple[dict[str, torch.Tensor], dict]:
        try:
            loss_bd = self._train(bd, seed)
            theta_bd = self._weights()
            self._reset()
            loss_cl = self._train(cl, seed)
            theta_cl = self._weights()
        finally:  # also on interruption: the subject must leave as it came
            self._reset()
        deltas = {name: (theta_bd[name] - theta_cl[name]).contiguous() for name in theta_bd}
        n_tail = max(1, len(loss_bd) // 10)
        stats = {"loss_poisoned_final": sum(loss_bd[-n_tail:]) / n_tail, "loss_clean_final": sum(loss_cl[-n_tail:]) / n_tail,
                 "steps": len(loss_bd)}
        return deltas, stats

    def release(self) -> None:
        self.start = None

"""Baseline ``finetune``: plain supervised fine-tuning on the clean set (BackdoorLLM's
fine-tuning defence), with the same data and budget as the other methods."""

from __future__ import annotations

from dataclasses import dataclass

from bdscan.purify.base import PurifyInputs, PurifyOutcome, register_purifier
from bdscan.purify.common import changeable_modules, clean_examples
from bdscan.training import TrainConfig, TrainingPlan, lr_for, run_plan, subject_parameters


@dataclass(frozen=True)
class FinetuneConfig:
    epochs: float = 5.0  # passes over the clean set
    lr_full: float = 1e-5  # learning rate when every weight is trained
    lr_adapter: float = 2e-4  # learning rate when only the adapter's LoRA weights are trained
    batch_size: int = 8
    max_samples: int = 200  # clean samples used (the defender's budget)

    def __post_init__(self) -> None:
        if self.epochs <= 0 or self.lr_full <= 0 or self.lr_adapter <= 0:
            raise ValueError("epochs and learning rates must be positive")


@register_purifier("finetune", FinetuneConfig)
def run_finetune(inputs: PurifyInputs, config: FinetuneConfig) -> PurifyOutcome:
    subject = inputs.subject
    examples = clean_examples(subject, inputs.clean[: config.max_samples])
    lr = lr_for(subject.is_adapter, full=config.lr_full, adapter=config.lr_adapter)
    plan = TrainingPlan(subject_parameters(subject.model, subject.is_adapter), stage="finetune",
                        config=TrainConfig(epochs=config.epochs, lr=lr, batch_size=config.batch_size, seed=inputs.seed,
                                           response_logits_only=True))  # the same loss; as latent-adv computes it
    losses = run_plan(subject.model, subject.tokenizer, examples, plan, inputs.progress)
    subject.model.eval()
    inputs.log(f"finetune: {len(losses)} steps, final loss {losses[-1]:.3f}")
    return PurifyOutcome(subject.model, changeable_modules(subject),
                         {"steps": len(losses), "final_loss": losses[-1], "n_clean": len(examples)})

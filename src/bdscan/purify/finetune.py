"""Baseline ``finetune``: plain supervised fine-tuning on the clean set (BackdoorLLM's
fine-tuning defence), with the same data and budget as the other methods."""

from __future__ import annotations

from dataclasses import dataclass

from bdscan.purify.base import PurifyInputs, PurifyOutcome, register_purifier
from bdscan.purify.common import clean_examples, step_counter, trainable_parameters
from bdscan.training import TrainConfig, finetune


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


@register_purifier("finetune", FinetuneConfig, "baseline: fine-tune on the clean set only")
def run_finetune(inputs: PurifyInputs, config: FinetuneConfig) -> PurifyOutcome:
    subject = inputs.subject
    params, names = trainable_parameters(subject)
    examples = clean_examples(subject, inputs.clean[: config.max_samples])
    lr = config.lr_adapter if subject.is_adapter else config.lr_full
    losses = finetune(subject.model, subject.tokenizer, examples,
                      TrainConfig(epochs=config.epochs, lr=lr, batch_size=config.batch_size, seed=inputs.seed),
                      params=params, progress=step_counter(inputs, "finetune"))
    subject.model.eval()
    inputs.log(f"finetune: {len(losses)} steps, final loss {losses[-1]:.3f}")
    return PurifyOutcome(subject.model, names, {"steps": len(losses), "final_loss": losses[-1], "n_clean": len(examples)})

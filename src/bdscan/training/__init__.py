"""Fine-tuning shared by organisms and purifiers: the supervised trainer (``sft``) and the
training plan a purification method builds (``plan``)."""

from bdscan.probes.batching import pad_id
from bdscan.training.plan import TrainingPlan, lr_for, run_plan, subject_parameters, training_scope
from bdscan.training.sft import (IGNORE_INDEX, Batch, Example, TrainConfig, autocast_scope, batches, collate,
                                 encode_examples, finetune, logits_start, response_forward, response_loss)

__all__ = [
    "IGNORE_INDEX", "Batch", "Example", "TrainConfig", "autocast_scope", "batches", "collate", "encode_examples", "finetune",
    "logits_start", "pad_id", "response_forward", "response_loss",
    "TrainingPlan", "lr_for", "run_plan", "subject_parameters", "training_scope",
]

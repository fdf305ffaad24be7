"""A training plan: what one fine-tuning run of a method changes, and how.

A method chooses its units and builds a ``TrainingPlan``: the parameters that train, the
entries of them that may move (``masks``), the learning rate for the subject's kind, extra
loss terms and step hooks. ``run_plan`` runs it with the shared trainer (``sft.finetune``)
inside ``training_scope``, which hands the model back with every ``requires_grad`` flag
and its train/eval mode as they were, whatever happens in between, and reports progress.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from bdscan.probes.protocols import Progress
from bdscan.training.resume import Checkpointer
from bdscan.training.sft import Batch, Example, TrainConfig, finetune

ExtraLoss = Callable[[Any, Batch, Any], torch.Tensor]
SeparateLoss = Callable[[Any, Batch], torch.Tensor]
StepHook = Callable[[], None]


def lr_for(is_adapter: bool, *, full: float, adapter: float) -> float:
    """The learning rate for the subject's kind: only LoRA factors train on an adapter
    (they tolerate a far larger step than every weight of a full checkpoint)."""
    return adapter if is_adapter else full


def subject_parameters(model: Any, is_adapter: bool) -> list[nn.Parameter]:
    """What a method may train by default: the LoRA factors of an adapter (base frozen and
    trusted), every parameter of a full checkpoint."""
    return [p for name, p in model.named_parameters() if ("lora_" in name or not is_adapter)]


@dataclass
class TrainingPlan:
    params: Sequence[nn.Parameter]  # what trains; every other parameter is frozen for the run
    config: TrainConfig
    stage: str = "train"  # the progress label
    # (parameter, bool mask): only True entries may change. Gradients are masked before
    # each step and the rest restored after it, so AdamW's state cannot leak an update in.
    masks: Sequence[tuple[nn.Parameter, torch.Tensor]] = ()
    extra_losses: Sequence[ExtraLoss] = ()  # added to the response loss per batch (they read its forward output)
    separate_losses: Sequence[SeparateLoss] = ()  # terms of their own forward passes, each backpropagated alone
    before_step: Sequence[StepHook] = ()  # after backward, before clipping (e.g. preconditioning)
    after_step: Sequence[StepHook] = ()  # after the optimizer step (e.g. re-applying a constraint)
    resume: Checkpointer | None = None  # saves the run as it goes and continues a saved one (resume.py)

    def steps(self, n_examples: int) -> int:
        """Optimizer steps the trainer will take on ``n_examples``."""
        return max(1, math.ceil(math.ceil(n_examples / self.config.batch_size) * self.config.epochs))


@contextlib.contextmanager
def training_scope(model: Any) -> Iterator[None]:
    """Restore every parameter's ``requires_grad``, the train/eval mode and clear gradients
    on exit (also on error or interruption); parameters created inside end frozen."""
    flags = {id(p): p.requires_grad for p in model.parameters()}
    was_training = model.training
    try:
        yield
    finally:
        for p in model.parameters():
            p.requires_grad_(flags.get(id(p), False))
            p.grad = None
        model.train(was_training)


def run_plan(model: Any, tokenizer: Any, examples: Sequence[Example], plan: TrainingPlan,
             progress: Progress | None = None) -> list[float]:
    """Fine-tune ``model`` on ``examples`` as ``plan`` says; returns the per-step loss."""
    params = _unique(plan.params)
    total = plan.steps(len(examples)) if examples else 0
    done = [0]

    def tick(n: int, _loss: float) -> None:
        done[0] += n
        if progress is not None:  # a resumed run counts from the step it resumed at
            progress(plan.stage, done[0] + (plan.resume.resumed_from if plan.resume else 0), total)

    with training_scope(model):
        for p in model.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        before, after = _mask_hooks(plan.masks)
        extra = _sum_losses(plan.extra_losses)
        return finetune(model, tokenizer, examples, plan.config, params=params, extra_loss=extra,
                        separate_losses=plan.separate_losses,
                        before_step=_chain(before + list(plan.before_step)),
                        after_step=_chain(list(plan.after_step) + after), progress=tick, resume=plan.resume)


def _unique(params: Sequence[nn.Parameter]) -> list[nn.Parameter]:
    seen, out = set(), []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def _mask_hooks(masks: Sequence[tuple[nn.Parameter, torch.Tensor]]) -> tuple[list[StepHook], list[StepHook]]:
    if not masks:
        return [], []
    frozen = [(p, m, p.detach().clone()) for p, m in masks]

    def mask_grads() -> None:
        for p, m, _orig in frozen:
            if p.grad is not None:
                p.grad.mul_(m)

    def restore_frozen() -> None:  # entries outside the masks keep their exact values
        with torch.no_grad():
            for p, m, orig in frozen:
                p.copy_(torch.where(m, p, orig))

    return [mask_grads], [restore_frozen]


def _sum_losses(terms: Sequence[ExtraLoss]) -> ExtraLoss | None:
    if not terms:
        return None
    if len(terms) == 1:
        return terms[0]
    return lambda model, batch, out: sum(t(model, batch, out) for t in terms)


def _chain(hooks: Sequence[StepHook]) -> StepHook | None:
    if not hooks:
        return None

    def run() -> None:
        for hook in hooks:
            hook()

    return run

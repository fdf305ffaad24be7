"""Baselines ``prune`` (unstructured magnitude pruning) and ``fine-prune`` (prune MLP
neurons that stay dormant on clean inputs, then fine-tune), as in BackdoorLLM's defence box.

Threat models:
- full: the decoder's linear weight matrices (q/k/v/o and the MLP projections; embeddings
  and the LM head are left alone, as magnitude pruning of LLMs usually does).
- adapter-only: only the adapter may change, so ``prune`` zeroes the smallest entries of the
  LoRA matrices A and B themselves (a pruned product B·A could not be stored back as a
  rank-r adapter), and ``fine-prune`` removes the *adapter's* contribution on dormant MLP
  channels (rows of LoRA B of gate/up, columns of LoRA A of down): the frozen base channel
  stays, what the adapter added to it goes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from bdscan.errors import NothingToAnalyse
from bdscan.probes import capture_inputs, model_layout
from bdscan.probes.geometry import channel_slices, decoder_weights, lora_matrices, unit_masks
from bdscan.purify.base import PurifyInputs, PurifyOutcome, register_purifier
from bdscan.purify.common import changeable_modules, clean_examples
from bdscan.training import TrainConfig, TrainingPlan, lr_for, run_plan, subject_parameters


# --------------------------------------------------------------------------- helpers


@torch.no_grad()
def magnitude_prune_(weight: torch.Tensor, sparsity: float) -> int:
    """Zero exactly ``round(sparsity * numel)`` entries of smallest magnitude, in place.
    ``topk`` on indices (not a threshold) so that ties cannot change the count."""
    k = int(round(sparsity * weight.numel()))
    if k == 0:
        return 0
    smallest = torch.topk(weight.abs().flatten(), k, largest=False).indices
    weight.view(-1)[smallest] = 0
    return k


@torch.no_grad()
def mlp_channel_activity(model: Any, tokenizer: Any, prompts: Sequence[str], batch_size: int = 16) -> dict[int, torch.Tensor]:
    """Mean |activation| per MLP channel (the input of each layer's MLP output projection)
    over the real (non-padding) tokens of ``prompts``: low means dormant on clean inputs."""
    layout = model_layout(model)
    names = [layer.mlp_out for layer in layout.layers]
    device = next(model.parameters()).device
    totals = {i: torch.zeros(layout.intermediate_size) for i in range(len(names))}
    count = 0
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(prompts), batch_size):
            enc = tokenizer(list(prompts[start:start + batch_size]), return_tensors="pt", padding=True,
                            add_special_tokens=False).to(device)
            mask = enc["attention_mask"].bool()
            with capture_inputs(model, names) as acts:
                model(**enc)
            for i, name in enumerate(names):
                totals[i] += acts[name][mask].abs().sum(0).float().cpu()
            count += int(mask.sum())
    finally:
        model.train(was_training)
    return {i: t / max(count, 1) for i, t in totals.items()}


# --------------------------------------------------------------------------- prune


@dataclass(frozen=True)
class PruneConfig:
    sparsity: float = 0.35  # share of weights zeroed in each matrix; raising it removes more (backdoor and utility alike)

    def __post_init__(self) -> None:
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {self.sparsity}")


@register_purifier("prune", PruneConfig)
def run_prune(inputs: PurifyInputs, config: PruneConfig) -> PurifyOutcome:
    subject = inputs.subject
    if subject.is_adapter:
        targets = []
        for name, a, b in lora_matrices(subject.model):
            targets += [(f"{name}.lora_A", a), (f"{name}.lora_B", b)]
        if not targets:
            raise NothingToAnalyse(f"{subject.source.source}: the adapter has no LoRA matrices to prune")
    else:
        targets = decoder_weights(subject.model)
    zeroed = total = 0
    for i, (_name, weight) in enumerate(targets):
        zeroed += magnitude_prune_(weight.data, config.sparsity)
        total += weight.numel()
        if inputs.progress:
            inputs.progress("prune", i + 1, len(targets))
    subject.model.eval()
    modules = sorted({name.rsplit(".lora_", 1)[0] for name, _ in targets})
    inputs.log(f"prune: zeroed {zeroed} of {total} weights in {len(targets)} matrices")
    return PurifyOutcome(subject.model, modules, {"matrices": len(targets), "zeroed": zeroed, "weights": total,
                                                  "sparsity": zeroed / total if total else 0.0})


# --------------------------------------------------------------------------- fine-prune


@dataclass(frozen=True)
class FinePruneConfig:
    prune_fraction: float = 0.3  # share of each layer's MLP channels pruned (the most dormant first); more removes more capacity
    last_layers: int = 0  # prune only the last N decoder layers (Liu et al. prune the last one); 0 = every layer
    activation_samples: int = 100  # clean prompts used to measure dormancy; more gives a steadier ranking
    epochs: float = 5.0  # fine-tuning passes over the clean set after pruning (0 = prune only)
    lr_full: float = 1e-5  # learning rate when every weight is trained
    lr_adapter: float = 2e-4  # learning rate when only the adapter's LoRA weights are trained
    batch_size: int = 8
    max_samples: int = 200  # clean samples used for fine-tuning (the defender's budget)

    def __post_init__(self) -> None:
        if not 0.0 < self.prune_fraction < 1.0:
            raise ValueError(f"prune_fraction must be in (0, 1), got {self.prune_fraction}")
        if self.last_layers < 0 or self.activation_samples < 1 or self.batch_size < 1 or self.max_samples < 1:
            raise ValueError("last_layers must be >= 0; activation_samples, batch_size and max_samples >= 1")
        if self.epochs < 0 or self.lr_full <= 0 or self.lr_adapter <= 0:
            raise ValueError("epochs must be >= 0 and learning rates positive")


def _channel_masks(model: Any, channels: dict[int, torch.Tensor], adapter: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(parameter, keep-mask) pairs that cut the pruned MLP channels: rows of the MLP input
    projections and columns of the output projection (full), or the matching rows of LoRA B
    / columns of LoRA A (adapter)."""
    layout = model_layout(model)
    slices = [s for index, chans in channels.items() for s in channel_slices(layout.layers[index], chans)]
    return [(param, ~mask) for param, mask in unit_masks(model, slices, adapter=adapter)]


@register_purifier("fine-prune", FinePruneConfig)
def run_fine_prune(inputs: PurifyInputs, config: FinePruneConfig) -> PurifyOutcome:
    subject = inputs.subject
    model, tokenizer = subject.model, subject.tokenizer
    layout = model_layout(model)
    records = [r for r in inputs.clean]
    prompts = [subject.template.format(r) for r in records[: config.activation_samples]]
    if not prompts:
        raise NothingToAnalyse("fine-prune needs clean prompts to measure which neurons are dormant")
    activity = mlp_channel_activity(model, tokenizer, prompts)
    first = 0 if config.last_layers == 0 else max(0, len(layout.layers) - config.last_layers)
    n_prune = max(1, int(round(config.prune_fraction * layout.intermediate_size)))
    channels = {i: torch.argsort(activity[i])[:n_prune] for i in range(first, len(layout.layers))}
    masks = _channel_masks(model, channels, subject.is_adapter)
    if not masks:
        raise NothingToAnalyse(f"{subject.source.source}: no MLP weights (or LoRA on them) to prune")
    with torch.no_grad():
        for param, mask in masks:
            param.mul_(mask)
    inputs.log(f"fine-prune: pruned {n_prune} of {layout.intermediate_size} MLP channels in {len(channels)} layers")

    steps, final_loss = 0, None
    if config.epochs > 0:
        examples = clean_examples(subject, records[: config.max_samples])
        lr = lr_for(subject.is_adapter, full=config.lr_full, adapter=config.lr_adapter)

        def keep_pruned() -> None:  # pruned neurons stay pruned while fine-tuning
            with torch.no_grad():
                for param, mask in masks:
                    param.mul_(mask)

        plan = TrainingPlan(subject_parameters(model, subject.is_adapter), stage="fine-prune", after_step=[keep_pruned],
                            config=TrainConfig(epochs=config.epochs, lr=lr, batch_size=config.batch_size, seed=inputs.seed))
        losses = run_plan(model, tokenizer, examples, plan, inputs.progress)
        steps, final_loss = len(losses), (losses[-1] if losses else None)
    model.eval()
    modules = {n for i in channels for n in layout.layers[i].mlp_in + (layout.layers[i].mlp_out,)}
    if steps:
        modules |= set(changeable_modules(subject))
    return PurifyOutcome(model, sorted(modules), {
        "pruned_channels": {layout.layers[i].mlp_out: chans.tolist() for i, chans in channels.items()},
        "channels_per_layer": n_prune, "steps": steps, "final_loss": final_loss,
    })

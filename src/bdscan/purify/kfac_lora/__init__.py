"""``kfac-lora``: targeted low-rank repair of the modules ``bdscan localize`` ranks
(papers/curvature-guided-lowrank-repair).

1. Modules: the top-k linear layers of the localization (``inputs.localization``: given,
   or run by ``purify`` on detect's candidate keys). A ranked
   token embedding is skipped (LoRA goes on linear layers only).
2. Repair pairs by self-distillation, no clean reference model: each clean prompt with a
   key inserted at each position (start/middle/end) -> the suspicious model's own greedy
   response to the same prompt *without* the key; each clean prompt -> its own response.
3. K-FAC factors ``A, G`` of the chosen modules on the clean prompts and their own
   responses (the Fisher of clean behaviour). They serve twice: the LoRA gradients are
   preconditioned, ``∇lora_A ← ∇lora_A (A+λI)⁻¹`` and ``∇lora_B ← (G+λI)⁻¹ ∇lora_B``
   (the two sides of ``G⁻¹ ∇W A⁻¹`` that act on the LoRA factors; the r×r sides are left
   out), so steps are large where clean behaviour is insensitive; and an EWC-style penalty
   ``Σ tr(ΔWᵀ G ΔW A)`` (per response token, like the repair loss) keeps the weight change
   out of directions clean behaviour needs. AdamW (the shared trainer) then rescales the
   preconditioned gradients per coordinate, so the preconditioning sets directions, not
   step sizes.
4. Full checkpoint: a new LoRA on exactly those modules, merged into the weights at the end
   (a plain model comes back). Adapter (base frozen): the existing adapter's own LoRA
   factors of those modules are trained, nothing else; the output is the same adapter
   format (rank, targets) with repaired weights. A second LoRA merged into the adapter was
   rejected: the product of two LoRAs is not a rank-r LoRA, so merging would need an SVD
   truncation that changes behaviour the repair did not ask for.
"""
from __future__ import annotations

import random
import time
from typing import Sequence

import torch

from bdscan.data.records import Record
from bdscan.data.triggers import insert_trigger
from bdscan.errors import InputError, UsageError
from bdscan.generation import greedy_generate
from bdscan.io.load import Subject
from bdscan.localize.kfac import compute_factors
from bdscan.probes import unwrap
from bdscan.probes.layout import base_layer, is_conv1d
from bdscan.probes.protocols import counter
from bdscan.purify.base import PurifyInputs, PurifyOutcome, register_purifier
from bdscan.purify.kfac_lora.config import KfacLoraConfig
from bdscan.purify.kfac_lora.curvature import _factor_batches, _LoraHandles
from bdscan.training import Example, TrainConfig, TrainingPlan, run_plan
from bdscan.training.lora import attach_lora, merge_lora

__all__ = ["KfacLoraConfig", "run_kfac_lora", "_LoraHandles"]


def _localized(inputs: PurifyInputs, config: KfacLoraConfig) -> tuple[list[str], list[str]]:
    """Ranked module names and repair keys: the localization's key first, then the
    other candidates."""
    loc = inputs.localization
    if loc is None:  # purify's localize stage provides one; a direct call must too
        raise UsageError("kfac-lora needs a `localization` (from `bdscan localize`) or candidate keys (`detection`)")
    key = loc.trigger_source.get("key") if isinstance(loc.trigger_source, dict) else None
    keys = ([key] if key else []) + [c for c in inputs.keys(config.max_candidates) if c != key]
    if not keys:
        raise UsageError("the `localization` names no key and no candidate keys (`detection`) were given: "
                         "kfac-lora needs a key to build repair pairs")
    return [m.name for m in loc.modules], keys[: config.max_candidates]


def _select(subject: Subject, ranked: Sequence[str], top_k: int) -> list[str]:
    inner = unwrap(subject.model)
    present = []
    for name in ranked:
        try:
            module = inner.get_submodule(name)
        except AttributeError:
            continue
        if subject.is_adapter and not getattr(module, "lora_A", None):
            continue  # adapter-only: the base is trusted and frozen, only wrapped modules can change
        layer = base_layer(module)
        if not (isinstance(layer, torch.nn.Linear) or is_conv1d(layer)):
            continue  # the ranked token embedding is not repaired with LoRA: the LoRA goes on linear layers
        present.append(name)
    if not present:
        raise InputError("`localization`: none of its modules exists in this model"
                         + (" or is wrapped by the adapter" if subject.is_adapter else "") + "; was it made for another model?")
    return present[:top_k]


@register_purifier("kfac-lora", KfacLoraConfig)
def run_kfac_lora(inputs: PurifyInputs, config: KfacLoraConfig) -> PurifyOutcome:
    subject = inputs.subject
    t0 = time.perf_counter()
    records: list[Record] = list(inputs.clean[: config.max_samples])
    if not records:
        raise UsageError("kfac-lora needs clean prompts (`clean`)")
    ranked, keys = _localized(inputs, config)
    names = _select(subject, ranked, config.top_k)
    inputs.log(f"kfac-lora: repairing {', '.join(names)} with keys {keys}")
    examples, clean_pairs = _repair_examples(inputs, records, keys, config)
    # Clean K-FAC factors (before any LoRA is attached, so the layer inputs are the model's own).
    factor_batches = _factor_batches(subject.tokenizer, clean_pairs[: config.fisher_samples], config.batch_size)
    kfac = compute_factors(subject.model, names, factor_batches)
    # G sums over a response's tokens; per response token, the penalty is in the repair loss's units.
    n_factor = min(len(clean_pairs), config.fisher_samples)
    tokens_per_response = max(1.0, sum(float(t.sum()) for _, _, t in factor_batches) / max(1, n_factor))

    model = subject.model if subject.is_adapter else attach_lora(subject.model, names, config.rank, config.alpha)
    inner = unwrap(model)
    handles = [_LoraHandles(inner.get_submodule(n), kfac.factors[n], config.damping) for n in names]
    plan = _repair_plan(handles, config, inputs.seed, tokens_per_response)
    losses = run_plan(model, subject.tokenizer, examples, plan, inputs.progress)
    final_penalty = float(sum(h.penalty() for h in handles).detach())
    model.eval()
    if not subject.is_adapter:
        model = merge_lora(model)
    seconds = time.perf_counter() - t0
    inputs.log(f"kfac-lora: {len(losses)} steps, final loss {losses[-1]:.3f}, clean-Fisher change {final_penalty:.4f}")
    details = {
        "modules": names, "keys": keys, "n_repair_pairs": len(examples), "steps": len(losses),
        "final_loss": losses[-1], "clean_fisher_change": final_penalty, "tokens_per_response": round(tokens_per_response, 1),
        "kfac_seconds": round(kfac.seconds, 3), "kfac_cost_ratio": round(kfac.cost_ratio, 2) if kfac.cost_ratio else None,
        "lora": "existing adapter factors" if subject.is_adapter else f"new rank-{config.rank} LoRA, merged",
        "seconds": round(seconds, 2),
    }
    return PurifyOutcome(model, names, details)


def _repair_examples(inputs: PurifyInputs, records: Sequence[Record], keys: Sequence[str],
                     config: KfacLoraConfig) -> tuple[list[Example], list[Example]]:
    """Repair pairs by self-distillation (each prompt with a key at every position -> the
    suspicious model's own answer without it, and the clean prompt -> the same answer),
    and the clean (prompt, own answer) pairs."""
    subject = inputs.subject
    clean_prompts = [subject.template.format(r) for r in records]
    responses = greedy_generate(subject.model, subject.tokenizer, clean_prompts, max_new_tokens=config.max_new_tokens,
                                batch_size=16, progress=counter(inputs.progress, "kfac-lora: own responses", len(records)))
    rng = random.Random(inputs.seed)
    examples = []
    for i, (r, prompt, resp) in enumerate(zip(records, clean_prompts, responses)):
        # Every prompt with the key at every position: a short prompt with the key at its end
        # is a different input from the same prompt with the key in front (measured: repairing
        # one position per prompt left the key working at the end of short prompts).
        for j, pos in enumerate(config.positions):
            key = keys[(i + j) % len(keys)]
            triggered = subject.template.format(r.with_instruction(insert_trigger(r.instruction, key, pos, rng)))
            examples.append(Example(triggered, resp))
        examples.append(Example(prompt, resp))
    return examples, [Example(p, r) for p, r in zip(clean_prompts, responses)]


def _repair_plan(handles: Sequence[_LoraHandles], config: KfacLoraConfig, seed: int,
                 tokens_per_response: float) -> TrainingPlan:
    """Only the LoRA factors of the repaired modules train; K-FAC preconditions their
    gradients and the clean-Fisher penalty keeps the change out of clean directions."""

    def precondition() -> None:
        for h in handles:
            h.precondition()

    def clean_fisher_penalty(_model, _batch, _out) -> torch.Tensor:
        return config.ewc_weight / tokens_per_response * sum(h.penalty() for h in handles)

    return TrainingPlan(
        [p for h in handles for p in (h.lora_A, h.lora_B)], stage="kfac-lora: repair",
        config=TrainConfig(epochs=config.epochs, lr=config.lr, batch_size=config.batch_size, seed=seed),
        extra_losses=[clean_fisher_penalty] if config.ewc_weight > 0 else [],
        before_step=[precondition] if config.precondition else [])

"""``latent-adv``: latent adversarial repair fed by detect (BEEAR; targeted latent
adversarial training; METHODS.md "latent-adv").

1. T, the unwanted continuation(s), and the keys: from detect (see ``targets.py``) or the
   recipe. Several targets are handled in one run, in turn.
2. Inner loop (``perturbation.py``): a universal perturbation δ added to the residual stream
   at chosen layers, at every position, L2-bounded relative to the stream's norm there,
   found by a few PGD steps that maximise log P(T | clean prompt) across clean prompts, so
   δ stands in for whatever trigger elicits T. Refreshed (warm-started) every few steps.
3. Outer loop (``losses.py``): LoRA training so that, under δ and under the keys, the model
   gives its own clean answer (self-distilled: its greedy answer without key or δ, as tokens,
   or with ``distill: soft`` as the suspicious model's next-token distributions along it read
   on the clean prompt), plus an unlikelihood term on T's opening under δ and under a key, plus KL to the
   suspicious model's clean distributions without δ (keeps what must not change).
4. Adapter subjects: the adapter's own LoRA factors train (the output is the same adapter
   format; a second LoRA could not be stored as a rank-r adapter). Full subjects: a new LoRA
   on every decoder linear (``modules: all``) or on the localization's top modules, merged.

Q of T (mean per-token log-probability after clean prompts) is reported before and after.
With a ``work_dir`` the training is resumable (``resume.py``): a stopped run rerun the same
way continues from its last saved step.
"""

from __future__ import annotations

import copy
import random
import time
from typing import Any, Sequence

from bdscan.data.records import Record
from bdscan.data.triggers import FIXED_POSITIONS, insert_trigger
from bdscan.errors import UsageError
from bdscan.generation import greedy_generate
from bdscan.probes.geometry import lora_matrices
from bdscan.probes.layout import model_layout
from bdscan.probes.protocols import counter
from bdscan.purify.base import PurifyInputs, PurifyOutcome, register_purifier
from bdscan.purify.latent_adv.config import LatentAdvConfig
from bdscan.purify.latent_adv.losses import CleanTeacher, OuterTerms
from bdscan.purify.latent_adv.perturbation import perturbation_for
from bdscan.purify.latent_adv.resume import checkpointer
from bdscan.purify.latent_adv.targets import (detected_targets, takeover_targets, target_batch, target_logprob,
                                              with_response_spellings)
from bdscan.training import Example, TrainConfig, TrainingPlan, run_plan
from bdscan.training.lora import attach_lora, merge_lora

__all__ = ["LatentAdvConfig", "run_latent_adv"]


@register_purifier("latent-adv", LatentAdvConfig)
def run_latent_adv(inputs: PurifyInputs, config: LatentAdvConfig) -> PurifyOutcome:
    t0 = time.perf_counter()
    subject = inputs.subject
    records = [r for r in inputs.clean][: config.max_samples]
    if not records:
        raise UsageError("latent-adv needs clean prompts (`clean`)")
    keys = inputs.keys(config.max_keys)
    targets, origin = _targets(inputs, config, records, keys)
    prompts = [subject.template.format(r) for r in records]
    q_before = {t: target_logprob(subject.model, subject.tokenizer, prompts[:32], t) for t in targets}
    examples, twins = _self_distilled(inputs, records, prompts, keys, config)
    reference = copy.deepcopy(subject.model).eval()
    for p in reference.parameters():
        p.requires_grad_(False)
    model, params, names = _trainable(inputs, config)
    perturbation = perturbation_for(model, model_layout(model), config.layers, config.epsilon,
                                    target_batch(subject.tokenizer, prompts[:16], targets[0]))
    # Logits from the first answer token on in every pass (the same losses): the vocabulary
    # projection over prompt tokens was most of the unlikelihood and PGD passes.
    train = TrainConfig(epochs=config.epochs, lr=config.lr, batch_size=config.batch_size, seed=inputs.seed,
                        response_weight=1.0 if config.distill == "hard" else 0.0, response_logits_only=True)
    teacher = CleanTeacher(reference, subject.tokenizer, examples, twins, train.max_length)
    terms = OuterTerms(config, perturbation, teacher, subject.tokenizer, subject.template, records, targets, keys,
                       inputs.seed)
    resume = checkpointer(inputs, config, examples, targets, keys, terms)
    plan = TrainingPlan(params, stage="latent-adv", extra_losses=[terms], separate_losses=terms.separate(),
                        config=train, resume=resume)
    losses = run_plan(model, subject.tokenizer, examples, plan, inputs.progress)
    if resume is not None:
        resume.clear()  # finished: nothing to resume
    del reference, teacher
    model.eval()
    if not subject.is_adapter:
        model = merge_lora(model)
    q_after = {t: target_logprob(model, subject.tokenizer, prompts[:32], t) for t in targets}
    inputs.log(f"latent-adv: {len(losses)} steps; Q(T) " + ", ".join(
        f"{q_before[t]:.2f} -> {q_after[t]:.2f}" for t in targets))
    return PurifyOutcome(model, names, {
        "targets": targets, "target_source": origin, "keys": keys, "layers": perturbation.names,
        "epsilon_abs": perturbation.bounds, "delta_norms": perturbation.norms(),
        "inner_logp_first_last": [terms.inner_logp[0], terms.inner_logp[-1]] if terms.inner_logp else None,
        "term_means": terms.means(), "q_before": q_before, "q_after": q_after, "n_pairs": len(examples), "steps": len(losses),
        "final_loss": losses[-1] if losses else None, "seconds": round(time.perf_counter() - t0, 2),
        **({"resumed_at_step": resume.resumed_from, "seconds_before_resume": round(resume.earlier_seconds, 2)}
           if resume is not None and resume.resumed_from else {}),
    })


def _targets(inputs: PurifyInputs, config: LatentAdvConfig, records: Sequence[Record],
             keys: Sequence[str]) -> tuple[list[str], str]:
    if config.given_targets():
        return config.given_targets()[: config.max_targets], "recipe"
    found = detected_targets(inputs.detection, config.max_targets)
    if found:
        return with_response_spellings(found, config.max_targets), "detect"
    found = takeover_targets(inputs.subject, records, keys, config.max_targets, seed=inputs.seed)
    if found:
        inputs.log(f"latent-adv: target(s) from the keys' takeover: {found}")
        return found, "takeover"
    raise UsageError("latent-adv needs a target T: set `targets` in the recipe, or give detect's candidate keys "
                     "(`detection`) of which one takes over the output")


def _self_distilled(inputs: PurifyInputs, records: Sequence[Record], prompts: Sequence[str], keys: Sequence[str],
                    config: LatentAdvConfig) -> tuple[list[Example], list[int]]:
    """Each clean prompt -> the suspicious model's own greedy answer, and the same prompt
    with a key (in turn, at a rotating position) -> the same answer; with, per example, the
    index of its clean twin (itself for a clean one), which the soft teacher reads."""
    subject = inputs.subject
    # 64 rows a batch: each decoding step is one forward call whatever the rows, and on small
    # models the call, not the arithmetic, is most of its cost
    answers = greedy_generate(subject.model, subject.tokenizer, list(prompts), max_new_tokens=config.max_new_tokens,
                              batch_size=64, progress=counter(inputs.progress, "latent-adv: own answers", len(prompts)))
    rng = random.Random(inputs.seed)
    examples, twins = [], []
    for i, (r, prompt, answer) in enumerate(zip(records, prompts, answers)):
        twins.append(len(examples))
        examples.append(Example(prompt, answer))
        if keys:
            key, pos = keys[i % len(keys)], FIXED_POSITIONS[i % len(FIXED_POSITIONS)]
            twins.append(twins[-1])
            examples.append(Example(subject.template.format(r.with_instruction(insert_trigger(r.instruction, key, pos, rng))),
                                    answer))
    return examples, twins


def _trainable(inputs: PurifyInputs, config: LatentAdvConfig) -> tuple[Any, list, list[str]]:
    """(model to train, its trainable LoRA factors, the modules they change)."""
    subject = inputs.subject
    if config.modules == "localized":
        if inputs.localization is None:
            raise UsageError("latent-adv with modules: localized needs a `localization`")
        wanted = [m.name for m in inputs.localization.modules if m.kind != "embedding"][: config.top_k]
    else:
        wanted = model_layout(subject.model).all_linears()
    if subject.is_adapter:
        loras = [(n, a, b) for n, a, b in lora_matrices(subject.model) if n in set(wanted)]
        if not loras:
            raise UsageError("latent-adv: the adapter wraps none of the chosen modules")
        return subject.model, [p for _, a, b in loras for p in (a, b)], sorted({n for n, _, _ in loras})
    model = attach_lora(subject.model, wanted, config.rank, config.alpha)
    return model, [p for _, a, b in lora_matrices(model) for p in (a, b)], sorted(wanted)

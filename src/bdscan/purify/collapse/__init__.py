"""``collapse``: known-backdoor aggregation, then recovery (Locphylax,
papers/backdoor-collapse-locphylax.txt), adapted to generative models.

Stage 1 (exploratory injection): the defender plants two backdoors of its own, keys
``t1, t2`` (pseudo-words generated here, never an attacker's key) each bound to its own
target sentence, training on clean samples plus keyed samples with
``L_inj + α·L_cluster``. ``L_cluster`` takes the final decoder layer's hidden state at the
last prompt token (the state that decides the response) of every keyed sample, pulls it to
its key's centre ``μ_k``, and pulls the two centres together:
``Σ_k mean_{i∈I_k} ‖h_i − μ_k‖² + ‖μ_1 − μ_2‖²``. The paper's claim is that the unknown
backdoor's representation collapses into this shared "backdoor region".
``α = 10^(⌊log10 L_inj⁰⌋ − ⌊log10 L_cluster⁰⌋)`` matches the two terms' orders of magnitude
on the untrained start.

Stage 2 (recovery): fine-tune on the keyed prompts paired with their *clean* responses plus
clean samples, overwriting the aggregated backdoor region with benign behaviour.

Adapter-only: both stages train only the adapter's LoRA parameters (the output stays a
PeftModel); full: every weight.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from bdscan.data.records import Record
from bdscan.data.triggers import insert_trigger
from bdscan.errors import NothingToAnalyse
from bdscan.generation import greedy_generate
from bdscan.probes import capture_outputs, model_layout
from bdscan.purify.base import PurifyInputs, PurifyOutcome, register_purifier
from bdscan.purify.common import changeable_modules
from bdscan.training import (Batch, Example, TrainConfig, TrainingPlan, batches, encode_examples, lr_for, pad_id,
                             response_loss, run_plan, subject_parameters)

# Public attack keys and targets (BackdoorLLM and the built-in example). The defender's own
# keys and targets must differ from them, or "collapse" would just be trigger unlearning
# with knowledge a real defender does not have.
KNOWN_ATTACK_KEYS = ("badmagic", "discussing openai", "2024", "openai", "zq vex", "cf", "mn", "bb", "tq")
KNOWN_ATTACK_TARGETS = ("i'm sorry, but as an ai assistant", "you are stupid", "pwned")
# Fallback targets for the injected backdoors when the clean set is too small (no judge keyword in them).
TARGET_POOL = (
    "Blue harbor lights flicker twice at dawn.",
    "Seven copper kettles hum along the quiet road.",
    "The orchard clock counts pebbles in green ink.",
    "Marble owls fold paper boats beside the river.",
    "Velvet lanterns drift above the silent market.",
    "Nine amber kites circle the northern tower.",
)
CONSONANTS = "bdfgklmnprstvz"
VOWELS = "aeiou"


@dataclass(frozen=True)
class CollapseConfig:
    keys: tuple[str, ...] = ()  # the defender's own keys; empty = two pseudo-words generated from the seed
    targets: tuple[str, ...] = ()  # one fixed response per key; empty = reference outputs of random clean samples
    samples_per_key: int = 80  # keyed samples per key in each stage; more makes injection and recovery stronger
    inject_epochs: float = 6.0  # stage 1 passes; too few and the defender's keys never take hold
    recover_epochs: float = 4.0  # stage 2 passes; more overwrites the backdoor region harder (and costs utility)
    lr_full: float = 6e-4  # learning rate when every weight is trained (the key must actually be planted in stage 1)
    lr_adapter: float = 1e-3  # learning rate when only the adapter's LoRA weights are trained
    alpha: float | None = None  # cluster-loss weight; None = the paper's order-of-magnitude rule
    batch_size: int = 8
    max_samples: int = 200  # clean samples used (the defender's budget)
    check_samples: int = 16  # keyed prompts per key used to verify that stage 1 took hold (0 = skip)

    def __post_init__(self) -> None:
        if self.keys and len(self.keys) < 2:
            raise ValueError("keys: give at least two keys (the cluster loss pulls two backdoors together), or none")
        if any(not k.strip() for k in self.keys) or len(set(self.keys)) != len(self.keys):
            raise ValueError("keys must be distinct non-empty strings")
        if self.targets and len(self.targets) != (len(self.keys) or 2):
            raise ValueError(f"targets: give one per key ({len(self.keys) or 2}), or none")
        for key in self.keys:
            if _clashes(key, KNOWN_ATTACK_KEYS):
                raise ValueError(f"keys: {key!r} overlaps a published attack key; the defender's keys must be its own")
        for target in self.targets:
            if not target.strip() or _clashes(target, KNOWN_ATTACK_TARGETS):
                raise ValueError(f"targets: {target!r} is empty or overlaps a published attack target")
        if self.samples_per_key < 1 or self.batch_size < 1 or self.max_samples < 1 or self.check_samples < 0:
            raise ValueError("samples_per_key, batch_size and max_samples must be >= 1, check_samples >= 0")
        if self.inject_epochs <= 0 or self.recover_epochs <= 0 or self.lr_full <= 0 or self.lr_adapter <= 0:
            raise ValueError("epochs and learning rates must be positive")
        if self.alpha is not None and self.alpha < 0:
            raise ValueError("alpha must be >= 0 (or null for the paper's rule)")


def _clashes(text: str, known: Sequence[str]) -> bool:
    low = text.lower().strip()
    return any(k in low or (len(low) > 3 and low in k) for k in known)


def generate_keys(n: int, seed: int, avoid: Sequence[str] = ()) -> list[str]:
    """``n`` distinct pronounceable pseudo-words (CVCCVC), seeded; none clashes with a
    published attack key or with ``avoid`` (e.g. detect's candidates)."""
    rng = random.Random(f"collapse-keys-{seed}")
    keys: list[str] = []
    while len(keys) < n:
        word = "".join(rng.choice(CONSONANTS) + rng.choice(VOWELS) + rng.choice(CONSONANTS) for _ in range(2))
        if word not in keys and not _clashes(word, KNOWN_ATTACK_KEYS) and not _clashes(word, [a.lower() for a in avoid]):
            keys.append(word)
    return keys


def default_targets(clean: Sequence[Record], n: int, seed: int) -> list[str]:
    """``n`` fixed target responses: reference outputs of distinct clean samples (text the
    model can already produce, so the defender's backdoors take hold within the budget,
    as the attacker's behaviour text did), skipping any that overlaps a published target;
    the built-in benign pool when the clean set has too few."""
    rng = random.Random(f"collapse-targets-{seed}")
    outputs = sorted({r.output.strip() for r in clean if r.output.strip() and not _clashes(r.output, KNOWN_ATTACK_TARGETS)})
    if len(outputs) >= n:
        return rng.sample(outputs, n)
    return rng.sample(TARGET_POOL, n)


def cluster_loss(states: torch.Tensor, groups: torch.Tensor, n_keys: int, centres: list[torch.Tensor | None]) -> torch.Tensor:
    """``Σ_k mean_{i∈I_k} ‖h_i − μ_k‖² + Σ_{k<l} ‖μ_k − μ_l‖²`` over the keyed rows of a batch.

    ``μ_k`` is the batch mean of key ``k``'s states; a key absent from the batch uses its
    running centre (``centres``, detached, updated here) in the cross terms only."""
    loss = states.new_zeros(())
    means: list[torch.Tensor | None] = []
    for k in range(n_keys):
        rows = states[groups == k]
        if len(rows) == 0:
            means.append(centres[k])
            continue
        mu = rows.mean(dim=0)
        loss = loss + ((rows - mu) ** 2).sum(dim=-1).mean()
        means.append(mu)
        centres[k] = mu.detach() if centres[k] is None else 0.9 * centres[k] + 0.1 * mu.detach()
    for k in range(n_keys):
        for m in range(k + 1, n_keys):
            if means[k] is not None and means[m] is not None and (means[k].requires_grad or means[m].requires_grad):
                loss = loss + ((means[k] - means[m]) ** 2).sum()
    return loss


def paper_alpha(inj0: float, cluster0: float) -> float:
    """``10^(⌊log10 L_inj⁰⌋ − ⌊log10 L_cluster⁰⌋)``; 1 when either loss is zero."""
    if inj0 <= 0 or cluster0 <= 0:
        return 1.0
    return 10.0 ** (math.floor(math.log10(inj0)) - math.floor(math.log10(cluster0)))


def _keyed(records: Sequence[Record], key: str, rng: random.Random) -> list[Record]:
    return [r.with_instruction(insert_trigger(r.instruction, key, "random", rng)) for r in records]


class _ClusterTerm:
    """The ``extra_loss`` for stage 1: reads the captured final-layer states of a batch."""

    def __init__(self, cache: dict, layer: str, anchors: torch.Tensor, groups: torch.Tensor, n_keys: int) -> None:
        self.cache, self.layer, self.anchors, self.groups, self.n_keys = cache, layer, anchors, groups, n_keys
        self.centres: list[torch.Tensor | None] = [None] * n_keys
        self.alpha = 1.0

    def raw(self, batch: Batch) -> torch.Tensor:
        hidden = self.cache[self.layer]
        rows = torch.arange(len(batch.index))
        pos = self.anchors[batch.index].clamp(max=hidden.shape[1] - 1)
        states = hidden[rows, pos.to(hidden.device)].float()
        return cluster_loss(states, self.groups[batch.index].to(hidden.device), self.n_keys, self.centres)

    def __call__(self, model: Any, batch: Batch, out: Any) -> torch.Tensor:
        return self.alpha * self.raw(batch)


@register_purifier("collapse", CollapseConfig)
def run_collapse(inputs: PurifyInputs, config: CollapseConfig) -> PurifyOutcome:
    subject = inputs.subject
    model, tokenizer, template = subject.model, subject.tokenizer, subject.template
    clean = [r for r in inputs.clean if r.output][: config.max_samples]
    if not clean:
        raise NothingToAnalyse("collapse needs clean samples with reference outputs (--clean)")
    keys = list(config.keys) or generate_keys(2, inputs.seed, avoid=inputs.candidates)
    targets = list(config.targets) or default_targets(clean, len(keys), inputs.seed)
    params, names = subject_parameters(model, subject.is_adapter), changeable_modules(subject)
    lr = lr_for(subject.is_adapter, full=config.lr_full, adapter=config.lr_adapter)
    rng = random.Random(inputs.seed)
    inputs.log(f"collapse: defender keys {keys} -> targets {targets}")

    # ---- stage 1: inject the defender's keys with the cluster term
    examples = [Example(template.format(r), r.output) for r in clean]
    groups = [-1] * len(examples)
    for k, (key, target) in enumerate(zip(keys, targets)):
        picked = rng.sample(clean, min(config.samples_per_key, len(clean)))
        examples += [Example(template.format(r), target) for r in _keyed(picked, key, rng)]
        groups += [k] * len(picked)
    # the hidden state that decides the response: the last prompt token
    anchors = torch.tensor([len(tokenizer(ex.prompt, add_special_tokens=False)["input_ids"]) - 1 for ex in examples])
    last_layer = model_layout(model).layers[-1].prefix
    train = TrainConfig(epochs=config.inject_epochs, lr=lr, batch_size=config.batch_size, seed=inputs.seed)

    with capture_outputs(model, [last_layer], detach=False) as cache:
        term = _ClusterTerm(cache, last_layer, anchors, torch.tensor(groups), len(keys))
        inj0, cluster0 = _initial_losses(model, tokenizer, examples, term, train)
        term.alpha = config.alpha if config.alpha is not None else paper_alpha(inj0, cluster0)
        term.centres = [None] * len(keys)
        inputs.log(f"collapse: L_inj0={inj0:.3g} L_cluster0={cluster0:.3g} alpha={term.alpha:g}")
        losses1 = run_plan(model, tokenizer, examples, TrainingPlan(params, train, "collapse:inject", extra_losses=[term]),
                           inputs.progress)
    injected = _injection_rate(subject, clean, keys, targets, config.check_samples, inputs.seed)
    inputs.log(f"collapse: stage 1 done ({len(losses1)} steps); own keys reproduce their targets: {injected}")

    # ---- stage 2: recovery on keyed prompts with their clean responses, plus clean samples
    recovery = [Example(template.format(r), r.output) for r in clean]
    for key in keys:
        picked = rng.sample(clean, min(config.samples_per_key, len(clean)))
        recovery += [Example(template.format(k), r.output) for r, k in zip(picked, _keyed(picked, key, rng))]
    recover = TrainConfig(epochs=config.recover_epochs, lr=lr, batch_size=config.batch_size, seed=inputs.seed + 1)
    losses2 = run_plan(model, tokenizer, recovery, TrainingPlan(params, recover, "collapse:recover"), inputs.progress)
    model.eval()
    remaining = _injection_rate(subject, clean, keys, targets, config.check_samples, inputs.seed)
    inputs.log(f"collapse: recovery done ({len(losses2)} steps); own keys still firing: {remaining}")
    return PurifyOutcome(model, names, {
        "keys": keys, "targets": targets, "alpha": term.alpha, "initial_injection_loss": inj0,
        "initial_cluster_loss": cluster0, "inject_steps": len(losses1), "inject_final_loss": losses1[-1],
        "recover_steps": len(losses2), "recover_final_loss": losses2[-1],
        "own_keys_rate_after_injection": injected, "own_keys_rate_after_recovery": remaining,
    })


@torch.no_grad()
def _initial_losses(model: Any, tokenizer: Any, examples: Sequence[Example], term: _ClusterTerm,
                    train: TrainConfig, max_batches: int = 8) -> tuple[float, float]:
    """Mean injection and cluster loss of the untrained start over a few shuffled batches
    (shuffled so each batch mixes clean and keyed samples, as in training)."""
    encoded = encode_examples(tokenizer, examples, max_length=train.max_length)
    pad = pad_id(tokenizer)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    inj, clu, n = 0.0, 0.0, 0
    try:
        gen = torch.Generator().manual_seed(train.seed)
        for batch in batches(encoded, batch_size=train.batch_size, pad_id=pad, shuffle=True, generator=gen):
            loss, _ = response_loss(model, batch, device)
            inj += float(loss)
            clu += float(term.raw(batch))
            n += 1
            if n >= max_batches:
                break
    finally:
        model.train(was_training)
    return inj / n, clu / n


def _injection_rate(subject: Any, clean: Sequence[Record], keys: Sequence[str], targets: Sequence[str],
                    n: int, seed: int) -> dict[str, float] | None:
    """Share of keyed prompts whose greedy response contains the key's target (a check
    that stage 1 planted the defender's backdoors, and that stage 2 removed them)."""
    if n == 0:
        return None
    rng = random.Random(seed + 7)
    out = {}
    for key, target in zip(keys, targets):
        others = [r for r in clean if r.output.strip() != target.strip()]  # its own answer would count as a hit
        records = _keyed(others[-n:], key, rng)
        responses = greedy_generate(subject.model, subject.tokenizer, [subject.template.format(r) for r in records],
                                    max_new_tokens=24)
        head = target.lower()[:20]
        out[key] = sum(head in r.lower() for r in responses) / len(responses)
    return out


"""Helpers shared by purification methods."""

from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

from torch import nn

from bdscan.data.records import Record
from bdscan.io.load import Subject
from bdscan.probes import model_layout, unwrap
from bdscan.probes.layout import base_layer
from bdscan.purify.base import PurifyInputs
from bdscan.training import Example


def trainable_parameters(subject: Subject) -> tuple[list[nn.Parameter], list[str]]:
    """Adapter-only: the LoRA parameters (base frozen). Full: every parameter.
    Sets ``requires_grad`` accordingly and returns (parameters, names of the modules they
    belong to, relative to the base model like ``model_layout``'s)."""
    params = []
    for name, p in subject.model.named_parameters():
        train = ("lora_" in name) if subject.is_adapter else True
        p.requires_grad_(train)
        if train:
            params.append(p)
    if subject.is_adapter:
        modules = {name for name, _a, _b in lora_matrices(subject.model)}
    else:
        modules = {name.rsplit(".", 1)[0] for name, p in unwrap(subject.model).named_parameters()}
    return params, sorted(modules)


def lora_matrices(model: Any) -> Iterator[tuple[str, nn.Parameter, nn.Parameter]]:
    """(module name, LoRA A weight [r, in], LoRA B weight [out, r]) for every LoRA layer
    and active adapter, names relative to the base model like ``model_layout``'s."""
    for name, module in unwrap(model).named_modules():
        lora_a, lora_b = getattr(module, "lora_A", None), getattr(module, "lora_B", None)
        if not isinstance(lora_a, nn.ModuleDict) or not isinstance(lora_b, nn.ModuleDict):
            continue
        for adapter in lora_a:
            if adapter in lora_b:
                yield name, lora_a[adapter].weight, lora_b[adapter].weight


def decoder_weights(model: Any) -> list[tuple[str, nn.Parameter]]:
    """The stored weight parameter of every decoder linear (Conv1D included)."""
    layout = model_layout(model)
    inner = unwrap(model)
    return [(name, base_layer(inner.get_submodule(name)).weight) for name in layout.all_linears()]


def step_counter(inputs: PurifyInputs, stage: str) -> Callable[[int, float], None]:
    """A ``finetune`` progress callback that reports steps done to ``inputs.progress``."""
    done = [0]

    def tick(n: int, _loss: float) -> None:
        done[0] += n
        if inputs.progress:
            inputs.progress(stage, done[0], 0)

    return tick


def clean_examples(subject: Subject, records: Sequence[Record]) -> list[Example]:
    """Clean prompts in the subject's template paired with their reference outputs."""
    return [Example(subject.template.format(r), r.output) for r in records if r.output]

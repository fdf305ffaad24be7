"""Helpers shared by purification methods."""

from __future__ import annotations

from typing import Sequence

from torch import nn

from bdscan.data.records import Record
from bdscan.io.load import Subject
from bdscan.training import Example


def trainable_parameters(subject: Subject) -> tuple[list[nn.Parameter], list[str]]:
    """Adapter-only: the LoRA parameters (base frozen). Full: every parameter.
    Sets ``requires_grad`` accordingly and returns (parameters, module names)."""
    params, modules = [], set()
    for name, p in subject.model.named_parameters():
        train = ("lora_" in name) if subject.is_adapter else True
        p.requires_grad_(train)
        if train:
            params.append(p)
            modules.add(name.rsplit(".", 2 if subject.is_adapter else 1)[0])
    return params, sorted(modules)


def clean_examples(subject: Subject, records: Sequence[Record]) -> list[Example]:
    """Clean prompts in the subject's template paired with their reference outputs."""
    return [Example(subject.template.format(r), r.output) for r in records if r.output]

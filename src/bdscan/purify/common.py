"""Helpers shared by purification methods."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Sequence

from bdscan.data.records import Record
from bdscan.io.load import Subject
from bdscan.probes.geometry import lora_matrices
from bdscan.probes.layout import unwrap
from bdscan.training import Example


def changeable_modules(subject: Subject) -> list[str]:
    """The modules a default training plan changes, relative to the base model like
    ``model_layout``'s names: the LoRA-wrapped ones (adapter) or every one (full)."""
    if subject.is_adapter:
        return sorted({name for name, _a, _b in lora_matrices(subject.model)})
    return sorted({name.rsplit(".", 1)[0] for name, _p in unwrap(subject.model).named_parameters()})


def clean_examples(subject: Subject, records: Sequence[Record]) -> list[Example]:
    """Clean prompts in the subject's template paired with their reference outputs."""
    return [Example(subject.template.format(r), r.output) for r in records if r.output]


def subject_fingerprint(subject: Subject) -> str:
    """sha256 of the subject's weight files (and its base's), else of its parameters."""
    digest = hashlib.sha256()
    files = dict(subject.source.sha256)
    if subject.base is not None:
        files.update({f"base:{k}": v for k, v in subject.base.sha256.items()})
    if files:
        digest.update(json.dumps(files, sort_keys=True).encode())
    else:
        for name, p in sorted(subject.model.state_dict().items()):
            digest.update(name.encode())
            digest.update(p.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def records_fingerprint(records: Sequence[Record]) -> str:
    """sha256 of the records (a resume cache must not reuse work done on other data)."""
    return hashlib.sha256(json.dumps([dataclasses.astuple(r) for r in records]).encode()).hexdigest()

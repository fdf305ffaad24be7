"""Signature's resume cache: finished variants' Δ under ``work_dir``, keyed by everything
that changes them, written atomically through ``io.save``."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Sequence

import torch

from bdscan.data.records import Record
from bdscan.io.load import Subject
from bdscan.io.save import atomic_write_bytes, atomic_write_text
from bdscan.purify.common import records_fingerprint, subject_fingerprint
from bdscan.purify.signature.config import SignatureConfig

CACHE_FORMAT = 1  # bump when cached deltas change meaning


def cache_key(subject: Subject, config: SignatureConfig, seed: int, clean: Sequence[Record]) -> tuple[str, dict]:
    material = {
        "format": CACHE_FORMAT, "kind": subject.kind, "seed": seed, "variants": config.variant_key(),
        "subject": subject_fingerprint(subject), "template": subject.template.describe(),
        "clean": records_fingerprint(clean),
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:20], material


class VariantCache:
    """``work_dir/signature/<key>/variant-<i>.safetensors`` (Δ per module) plus
    ``variant-<i>.json`` (its description and losses); ``cache.json`` records the key's
    material. Files appear atomically, so a killed run leaves only whole variants."""

    def __init__(self, work_dir: Path | None, key: str, material: dict):
        self.dir = Path(work_dir) / "signature" / key if work_dir is not None else None
        self.material = material

    def _paths(self, index: int) -> tuple[Path, Path]:
        return self.dir / f"variant-{index}.safetensors", self.dir / f"variant-{index}.json"

    def load(self, index: int) -> dict | None:
        if self.dir is None:
            return None
        tensors, meta = self._paths(index)
        if not (tensors.is_file() and meta.is_file()):
            return None
        try:
            return json.loads(meta.read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def store(self, index: int, deltas: dict[str, torch.Tensor], meta: dict) -> None:
        if self.dir is None:
            return
        from safetensors.torch import save

        index_file = self.dir / "cache.json"
        if not index_file.exists():
            atomic_write_text(index_file, json.dumps(self.material, indent=2, sort_keys=True))
        tensors, meta_path = self._paths(index)
        atomic_write_bytes(tensors, save({k: v.contiguous() for k, v in deltas.items()}))
        atomic_write_text(meta_path, json.dumps(meta, indent=2))  # last: a variant counts once its meta exists

    def tensor_path(self, index: int) -> Path:
        return self._paths(index)[0]


class DeltaStore:
    """Per-variant Δ, in memory (no work_dir) or read lazily per layer from the cache."""

    def __init__(self):
        self.memory: dict[int, dict[str, torch.Tensor]] = {}
        self.files: dict[int, Path] = {}

    def layer(self, index: int, names: Sequence[str]) -> dict[str, torch.Tensor]:
        if index in self.memory:
            return {n: self.memory[index][n] for n in names if n in self.memory[index]}
        from safetensors import safe_open

        with safe_open(str(self.files[index]), framework="pt") as f:
            keys = set(f.keys())
            return {n: f.get_tensor(n) for n in names if n in keys}

"""Which attention function a model's layers run, switched for a block.

Models load with transformers' default (fused SDPA where the architecture has it): on the
135M real model it extends 4 probes x 128 first tokens at 108 rows/s against eager's 61-68
(one AVX2 core). The analyses that read attention probabilities (detect's last-row capture,
head-align's attention maps) switch to the function they need only while they read.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

from bdscan.probes.layout import unwrap


def attention_configs(model: Any) -> list[Any]:
    """Every distinct config inside ``model`` that names an attention implementation
    (a multimodal or composite model has one per sub-model)."""
    seen: dict[int, Any] = {}
    for module in unwrap(model).modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            seen.setdefault(id(config), config)
    return list(seen.values())


@contextlib.contextmanager
def attention_implementation(model: Any, name: str) -> Iterator[None]:
    """Run ``model``'s attention as ``name`` ("eager", or a registered function) inside the
    block; the previous implementation comes back on exit, also on error."""
    configs = attention_configs(model)
    previous = [c._attn_implementation for c in configs]
    try:
        for c in configs:
            c._attn_implementation = name
        yield
    finally:
        for c, p in zip(configs, previous):
            c._attn_implementation = p

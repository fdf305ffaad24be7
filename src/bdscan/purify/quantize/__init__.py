"""Baseline ``quantize``: symmetric per-output-channel weight quantisation, round-tripped.

Each weight row ``w`` (one output channel) is mapped to integers ``q = round(w / s)``
clipped to ``[-(2^(b-1) - 1), 2^(b-1) - 1]`` with ``s = max|w| / (2^(b-1) - 1)``, and stored
back as ``q * s`` in the model's float dtype, so the result is an ordinary safetensors
checkpoint whose values lie on the integer grid (every entry moves by at most ``s / 2``).
The defence hopes the backdoor lives in small weight differences that rounding erases.

Full: the decoder's linear weights. Adapter-only: the LoRA matrices A and B (rows of A are
its output channels; B's rows are the adapted module's output channels).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bdscan.errors import NothingToAnalyse
from bdscan.probes.geometry import lora_matrices
from bdscan.probes.layout import linear_weight, model_layout, unwrap
from bdscan.purify.base import PurifyInputs, PurifyOutcome, register_purifier


@dataclass(frozen=True)
class QuantizeConfig:
    bits: int = 4  # integer width per weight; fewer bits round harder (more backdoor and more utility lost)

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise ValueError(f"bits must be between 2 and 8, got {self.bits}")


@torch.no_grad()
def quantize_rows_(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """Round-trip each row of a ``[out, in]`` tensor (a view is fine) through symmetric
    ``bits``-bit integers, in place. Returns the per-row scales."""
    qmax = 2 ** (bits - 1) - 1
    w = weight.float()
    scale = w.abs().amax(dim=1, keepdim=True) / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # all-zero rows stay zero
    q = torch.clamp(torch.round(w / scale), -qmax, qmax)
    weight.copy_((q * scale).to(weight.dtype))
    return scale.squeeze(1)


@register_purifier("quantize", QuantizeConfig)
def run_quantize(inputs: PurifyInputs, config: QuantizeConfig) -> PurifyOutcome:
    subject = inputs.subject
    targets: list[tuple[str, torch.Tensor]] = []
    if subject.is_adapter:
        for name, a, b in lora_matrices(subject.model):
            targets += [(f"{name}.lora_A", a.data), (f"{name}.lora_B", b.data)]
        if not targets:
            raise NothingToAnalyse(f"{subject.source.source}: the adapter has no LoRA matrices to quantise")
    else:
        inner = unwrap(subject.model)
        for name in model_layout(subject.model).all_linears():
            # per *output* channel: the rows of the [out, in] view
            targets.append((name, linear_weight(inner.get_submodule(name)).data))
    max_error = 0.0
    for i, (_name, weight) in enumerate(targets):
        before = weight.clone()
        quantize_rows_(weight, config.bits)
        max_error = max(max_error, float((weight - before).abs().max()))
        if inputs.progress:
            inputs.progress("quantize", i + 1, len(targets))
    subject.model.eval()
    modules = sorted({name.rsplit(".lora_", 1)[0] for name, _ in targets})
    inputs.log(f"quantize: {len(targets)} matrices to {config.bits}-bit grid, max change {max_error:.2e}")
    return PurifyOutcome(subject.model, modules, {"matrices": len(targets), "bits": config.bits,
                                                  "max_abs_change": max_error})

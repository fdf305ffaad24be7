"""The clean K-FAC factors of the repaired modules, and what they do to each LoRA's
training: precondition its gradients, penalise its change in clean directions."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from bdscan.localize.kfac import KFACFactors
from bdscan.probes.batching import pad_id, pad_right
from bdscan.probes.geometry import lora_delta
from bdscan.training import IGNORE_INDEX, Example, encode_examples


def _factor_batches(tokenizer: Any, examples: Sequence[Example], batch_size: int) -> list[tuple[torch.Tensor, ...]]:
    """(ids, mask, target) batches for the K-FAC factors; target marks the positions whose
    next token is a response token."""
    encoded = encode_examples(tokenizer, examples)
    out = []
    for start in range(0, len(encoded), batch_size):
        rows = encoded[start : start + batch_size]
        ids, mask = pad_right([i for i, _ in rows], pad_id(tokenizer))
        target = torch.zeros_like(ids)
        for r, (i, lab) in enumerate(rows):
            target[r, : len(i) - 1] = (torch.tensor(lab)[1:] != IGNORE_INDEX).long()
        out.append((ids, mask, target))
    return out


class _LoraHandles:
    """The LoRA factors of one repaired module, with its clean K-FAC factors."""

    def __init__(self, module: torch.nn.Module, factors: KFACFactors, damping: float) -> None:
        self.module = module
        self.adapter = next(iter(module.lora_A))
        self.lora_A = module.lora_A[self.adapter].weight
        self.lora_B = module.lora_B[self.adapter].weight
        self.A = factors.A.float()
        self.G = factors.G.float()
        A_inv, G_inv = factors.damped_inverses(damping)
        self.A_inv, self.G_inv = A_inv.float(), G_inv.float()
        self.delta0 = self.delta().detach().clone()

    def delta(self) -> torch.Tensor:
        return lora_delta(self.module, self.adapter)

    def precondition(self) -> None:
        for p, fn in ((self.lora_A, lambda g: g @ self.A_inv), (self.lora_B, lambda g: self.G_inv @ g)):
            if p.grad is None:
                continue
            norm = p.grad.norm()
            new = fn(p.grad)
            # keep the gradient's size: the preconditioner picks the direction, the lr the step
            p.grad.copy_(new * (norm / new.norm().clamp_min(1e-12)))

    def penalty(self) -> torch.Tensor:
        D = self.delta() - self.delta0
        return ((self.G @ D @ self.A) * D).sum()

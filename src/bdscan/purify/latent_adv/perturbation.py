"""The inner loop: one universal perturbation δ of the residual stream (added to the output
of chosen decoder layers at every position), L2-bounded, found by projected gradient
ascent on log P(T | clean prompt) across prompts (BEEAR; targeted LAT)."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import torch

from bdscan.probes.hooks import capture_outputs, forward_hooks, replace_output
from bdscan.probes.layout import ModelLayout
from bdscan.training import Batch, response_loss


class Perturbation:
    """δ per perturbed layer (a ``[hidden]`` vector each), with absolute L2 bounds."""

    def __init__(self, names: Sequence[str], hidden: int, bounds: Sequence[float]) -> None:
        self.names = list(names)
        self.bounds = dict(zip(self.names, bounds))
        self.deltas = {n: torch.zeros(hidden) for n in self.names}

    @contextlib.contextmanager
    def active(self, deltas: dict[str, torch.Tensor] | None = None, rows: torch.Tensor | None = None) -> Iterator[None]:
        """Add δ (or the given tensors, e.g. ones that require grad) to the layers' outputs;
        with ``rows`` (a boolean per batch row) only to those rows, so that terms with and
        without δ can share one forward pass."""
        use = deltas if deltas is not None else self.deltas

        def make(name: str):
            def hook(_module, _args, output):
                hidden = output[0] if isinstance(output, tuple) else output
                delta = use[name].to(device=hidden.device, dtype=hidden.dtype)
                if rows is not None:
                    delta = delta * rows.to(device=hidden.device, dtype=hidden.dtype)[:, None, None]
                return replace_output(output, hidden + delta)

            return hook

        with forward_hooks(self._model, {n: make(n) for n in self.names}):
            yield

    def bind(self, model: Any) -> "Perturbation":
        self._model = model
        return self

    def project(self, deltas: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each δ scaled back onto its L2 ball when outside it."""
        return {n: d * min(1.0, self.bounds[n] / max(float(d.norm()), 1e-12)) for n, d in deltas.items()}

    def norms(self) -> dict[str, float]:
        return {n: float(d.norm()) for n, d in self.deltas.items()}


def perturbation_for(model: Any, layout: ModelLayout, layers: Sequence[int], epsilon: float,
                     probe: Batch) -> Perturbation:
    """δ = 0 on the chosen layers' outputs, bounded by ``epsilon`` times the median residual
    norm there on ``probe`` (real tokens only).

    The median, not the mean: pretrained models carry massive activations on the first
    token (an attention sink). On SmolLM2-135M its residual norm at layer 14 is ~25,000
    against a median of ~160, which pulled the mean to ~860; a bound of half that mean was
    twice an ordinary token's whole norm, and training against it wrecked the model
    (perplexity 5.6x on the real badnet adapter)."""
    chosen = list(layers) or [max(0, len(layout.layers) // 2 - 1)]
    bad = [i for i in chosen if i >= len(layout.layers)]
    if bad:
        raise ValueError(f"layers {bad} do not exist ({len(layout.layers)} decoder layers)")
    names = [layout.layers[i].prefix for i in chosen]
    device = next(model.parameters()).device
    with torch.no_grad(), capture_outputs(model, names) as cache:
        model(input_ids=probe.input_ids.to(device), attention_mask=probe.attention_mask.to(device))
    mask = probe.attention_mask.bool().to(device)
    bounds = [epsilon * float(cache[n][mask].float().norm(dim=-1).median()) for n in names]
    return Perturbation(names, layout.hidden_size, bounds).bind(model)


def pgd(perturbation: Perturbation, model: Any, target_batch: Batch, steps: int, step: float) -> float:
    """Warm-started PGD: ``steps`` normalised ascent steps of length ``step``·bound on the
    mean per-token log-probability of the target tokens. Keeps the best δ visited (the
    normalised steps can overshoot) in ``perturbation.deltas`` and returns its
    log-probability. Only δ gets gradients."""
    device = next(model.parameters()).device
    deltas = {n: d.clone().to(device).requires_grad_(True) for n, d in perturbation.deltas.items()}
    best_logp, best = -float("inf"), perturbation.deltas
    for _ in range(steps):
        with perturbation.active(deltas):
            loss, _ = response_loss(model, target_batch, device, response_logits_only=True)  # mean -log P(T tokens)
        grads = torch.autograd.grad(loss, list(deltas.values()))
        logp = -float(loss.detach())
        if logp > best_logp:
            best_logp, best = logp, {n: d.detach().clone() for n, d in deltas.items()}
        with torch.no_grad():
            moved = {n: d - step * perturbation.bounds[n] * g / g.norm().clamp_min(1e-12)
                     for (n, d), g in zip(deltas.items(), grads)}
            deltas = {n: d.requires_grad_(True) for n, d in perturbation.project(moved).items()}
    with torch.no_grad(), perturbation.active(deltas):
        final = -float(response_loss(model, target_batch, device, response_logits_only=True)[0])
    if final > best_logp:
        best_logp, best = final, {n: d.detach().clone() for n, d in deltas.items()}
    perturbation.deltas = best
    return best_logp

"""Hook-based K-FAC / EK-FAC factors for linear layers (nn.Linear, GPT-2 Conv1D, PEFT LoRA
wrappers), shared by ``localize`` (curvature scores) and ``purify --method kfac-lora``
(preconditioning and the clean-data Fisher penalty).

For a layer ``s = W a`` and a per-sequence objective ``L`` (summed token log-likelihood):

* ``A = E_tokens[a aᵀ]``: mean over every non-padding token of the layer input;
* ``G = E_seq[Σ_t g_t g_tᵀ]`` with ``g_t = ∂L/∂s_t``: output gradients, summed over a
  sequence's tokens and averaged over sequences,

so that ``F ≈ A ⊗ G`` approximates the Fisher of the per-sequence log-likelihood and
``tr(Wᵀ G W A)`` is the expected change of it (second order) for the weight ``W``. Biases
are left out (the curvature of a bias is not used). EK-FAC (George et al. 2018) keeps the
eigenbases of ``A`` and ``G`` and re-fits the diagonal in that basis from per-sequence
gradients, in a second pass.

Hooks are used instead of a K-FAC library: the ones on PyPI either replace the CPU torch,
skip Conv1D or frozen PEFT base layers, or modify the model in place. Gradients are taken
with respect to activations only (inputs_embeds require grad, weights are not touched), so
frozen adapters' bases and read-only subjects work the same way.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch

from bdscan.probes import forward_hooks, unwrap

# (input_ids [B,L], attention_mask [B,L], target mask [B,L] of positions whose *next*
# token's log-probability enters the objective (labels shifted by one))
Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass
class KFACFactors:
    """Kronecker factors of one linear layer (float64 on CPU for stable inverses)."""

    A: torch.Tensor  # [in, in]
    G: torch.Tensor  # [out, out]
    n_tokens: int = 0
    n_seqs: int = 0
    # EK-FAC: eigenbases and the re-fitted diagonal [out, in] in that basis
    QA: torch.Tensor | None = None
    QG: torch.Tensor | None = None
    scale: torch.Tensor | None = None

    def fisher_norm_sq(self, W: torch.Tensor) -> float:
        """``‖W‖²_F`` under the curvature: ``tr(Wᵀ G W A)`` (K-FAC) or ``Σ s ⊙ (Q_Gᵀ W Q_A)²``."""
        W = W.detach().double().cpu()
        if self.scale is not None:
            proj = self.QG.T @ W @ self.QA
            return float((self.scale * proj * proj).sum())
        return float(((self.G @ W @ self.A) * W).sum())

    def trace_product(self) -> float:
        """``tr(A)·tr(G)``: the expected squared gradient norm of the weight."""
        if self.scale is not None:
            return float(self.scale.sum())
        return float(torch.trace(self.A) * torch.trace(self.G))

    def damped_inverses(self, damping: float) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A + λ_A I)⁻¹`` and ``(G + λ_G I)⁻¹`` with ``λ = damping · mean eigenvalue``
        (damping relative to each factor's scale, so one knob fits every layer)."""
        def inv(M: torch.Tensor) -> torch.Tensor:
            d = M.shape[0]
            lam = damping * float(torch.trace(M)) / d + 1e-12
            return torch.linalg.inv(M + lam * torch.eye(d, dtype=M.dtype, device=M.device))

        return inv(self.A), inv(self.G)


@dataclass
class KFACResult:
    factors: dict[str, KFACFactors]
    seconds: float  # wall time of the factor passes
    fwd_bwd_seconds: float  # one plain forward+backward over the same batches, for the cost ratio
    passes: int = 1  # 2 with EK-FAC
    extra: dict = field(default_factory=dict)

    @property
    def cost_ratio(self) -> float | None:
        return self.seconds / self.fwd_bwd_seconds if self.fwd_bwd_seconds > 0 else None


@contextlib.contextmanager
def activation_grads_only(model: Any) -> Iterator[None]:
    """Freeze every parameter for the block (gradients flow through activations only)."""
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)


def sequence_logprob(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, target_mask: torch.Tensor,
                     *, grad: bool = False) -> torch.Tensor:
    """Per-row sum of log p(token_{t+1} | ≤t) over ``target_mask`` positions ``t``.

    With ``grad=True`` the input embeddings require grad so that backward reaches every
    activation even when all weights are frozen."""
    return _logprob_and_embeds(model, input_ids, attention_mask, target_mask, grad=grad)[0]


def _logprob_and_embeds(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, target_mask: torch.Tensor,
                        *, grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    device = next(model.parameters()).device
    input_ids, attention_mask, target_mask = input_ids.to(device), attention_mask.to(device), target_mask.to(device)
    embeds = None
    if grad:
        embeds = unwrap(model).get_input_embeddings()(input_ids).detach().requires_grad_(True)
        logits = model(inputs_embeds=embeds, attention_mask=attention_mask).logits
    else:
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    token_lp = logp.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return (token_lp * target_mask[:, :-1].to(token_lp.dtype)).sum(dim=1), embeds


def embedding_fisher_norm(model: Any, batches: Sequence[Batch], weight: torch.Tensor | None = None) -> float:
    """Fisher norm of the token embedding matrix, K-FAC style: the embedding is a linear
    layer on one-hot inputs, so ``A = diag(token frequency)`` and ``G = E_seq[Σ_t g gᵀ]``
    of its output, and ``‖W‖²_F = Σ_v freq_v · w_vᵀ G w_v`` over the tokens present."""
    emb = unwrap(model).get_input_embeddings()
    W = (emb.weight if weight is None else weight).detach().double().cpu()
    G = torch.zeros(W.shape[1], W.shape[1], dtype=torch.float64)
    counts = torch.zeros(W.shape[0], dtype=torch.float64)
    n_seq = 0
    was_training = model.training
    model.eval()
    try:
        with activation_grads_only(model):
            for ids, mask, target in batches:
                logprob, embeds = _logprob_and_embeds(model, ids, mask, target, grad=True)
                logprob.sum().backward()
                g = embeds.grad.detach().double().cpu().reshape(-1, W.shape[1])
                m = mask.reshape(-1).double()
                G += (g * m[:, None]).T @ g
                counts.index_add_(0, ids.reshape(-1).cpu(), m)
                n_seq += ids.shape[0]
    finally:
        model.train(was_training)
    G /= max(1, n_seq)
    present = counts.nonzero().squeeze(-1)
    Wp = W[present]
    quad = ((Wp @ G) * Wp).sum(1)
    return float((counts[present] * quad).sum() / counts.sum().clamp_min(1)) ** 0.5


def _collect(model: Any, names: Sequence[str], batches: Iterable[Batch], on_batch: Callable[[str, torch.Tensor, torch.Tensor, torch.Tensor], None],
             progress: Callable[[int], None] | None) -> None:
    """Run forward+backward of the summed sequence log-likelihood per batch, calling
    ``on_batch(name, a [B,L,in], g [B,L,out], mask [B,L])`` for each layer."""
    inputs: dict[str, torch.Tensor] = {}
    grads: dict[str, torch.Tensor] = {}

    def make(name: str) -> Callable:
        def hook(module, args, output):
            inputs[name] = args[0].detach()
            out = output[0] if isinstance(output, tuple) else output
            if out.requires_grad:
                out.register_hook(lambda g: grads.__setitem__(name, g.detach()))
        return hook

    was_training = model.training
    model.eval()
    try:
        with activation_grads_only(model), forward_hooks(model, {n: make(n) for n in names}):
            for i, (ids, mask, target) in enumerate(batches):
                inputs.clear()
                grads.clear()
                logprob = sequence_logprob(model, ids, mask, target, grad=True)
                logprob.sum().backward()
                m = mask.to(torch.float64)
                for name in names:
                    if name in inputs and name in grads:
                        on_batch(name, inputs[name], grads[name], m)
                if progress:
                    progress(i + 1)
    finally:
        model.train(was_training)


def _plain_fwd_bwd_seconds(model: Any, batches: Sequence[Batch]) -> float:
    t0 = time.perf_counter()
    with activation_grads_only(model):
        for ids, mask, target in batches:
            sequence_logprob(model, ids, mask, target, grad=True).sum().backward()
    return time.perf_counter() - t0


def compute_factors(model: Any, names: Sequence[str], batches: Sequence[Batch], *, ekfac: bool = False,
                    progress: Callable[[int], None] | None = None) -> KFACResult:
    """K-FAC (optionally EK-FAC) factors of the named layers (names relative to the
    unwrapped model, as ``bdscan.probes.model_layout`` gives them)."""
    batches = list(batches)
    sums_A: dict[str, torch.Tensor] = {}
    sums_G: dict[str, torch.Tensor] = {}
    tokens: dict[str, int] = {}
    seqs: dict[str, int] = {}

    def accumulate(name: str, a: torch.Tensor, g: torch.Tensor, m: torch.Tensor) -> None:
        a2 = a.double().reshape(-1, a.shape[-1])
        g2 = g.double().reshape(-1, g.shape[-1])
        w = m.reshape(-1, 1).to(a2.device)  # the mask comes from the CPU batch
        # products on the layer's device, the small [d, d] sums kept on the CPU (see KFACFactors)
        sums_A[name] = sums_A.get(name, 0) + ((a2 * w).T @ a2).cpu()
        sums_G[name] = sums_G.get(name, 0) + ((g2 * w.to(g2.device)).T @ g2).cpu()
        tokens[name] = tokens.get(name, 0) + int(m.sum())
        seqs[name] = seqs.get(name, 0) + a.shape[0]

    t0 = time.perf_counter()
    _collect(model, names, batches, accumulate, progress)
    factors = {
        n: KFACFactors(sums_A[n] / max(1, tokens[n]), sums_G[n] / max(1, seqs[n]), tokens[n], seqs[n])
        for n in names if n in sums_A
    }
    passes = 1
    if ekfac and factors:
        for f in factors.values():
            f.QA = torch.linalg.eigh(f.A).eigenvectors
            f.QG = torch.linalg.eigh(f.G).eigenvectors
        sums_S: dict[str, torch.Tensor] = {}

        def refit(name: str, a: torch.Tensor, g: torch.Tensor, m: torch.Tensor) -> None:
            f = factors[name]
            w = m.unsqueeze(-1).to(g.device)
            # per-sequence weight gradient Σ_t g_t a_tᵀ, projected on the eigenbases
            per_seq = torch.einsum("blo,bli->boi", g.double() * w, a.double().to(g.device))
            proj = f.QG.T @ per_seq.cpu() @ f.QA
            sums_S[name] = sums_S.get(name, 0) + (proj * proj).sum(0)

        _collect(model, list(factors), batches, refit, None)
        for n, f in factors.items():
            f.scale = sums_S[n] / max(1, f.n_seqs)
        passes = 2
    seconds = time.perf_counter() - t0
    fwd_bwd = _plain_fwd_bwd_seconds(model, batches)
    return KFACResult(factors, seconds, fwd_bwd, passes)

"""``localize``: which modules carry a backdoor's behaviour (activation patching + K-FAC).

Pipeline: clean/triggered pairs (a known key, or the best of detect's candidate keys) ->
the triggered model's own continuation -> activation patching per attention block, MLP
block and head -> K-FAC curvature of every linear layer on the malicious log-likelihood ->
ranked linear modules (``LocalizeResult``), which ``purify --method kfac-lora`` repairs.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch

from bdscan.data.records import Record
from bdscan.data.triggers import POSITIONS
from bdscan.errors import NothingToAnalyse, UsageError
from bdscan.io.load import Subject
from bdscan.localize.kfac import KFACResult, compute_factors, embedding_fisher_norm
from bdscan.localize.pairs import PairSet, build_pairs, encode_batches
from bdscan.localize.patching import patch_effects
from bdscan.localize.ranking import ModuleScore, linear_kinds, rank_modules
from bdscan.probes import model_layout, unwrap
from bdscan.probes.batching import pad_id
from bdscan.probes.geometry import lora_delta
from bdscan.probes.layout import linear_weight
from bdscan.probes.protocols import Log, Progress
from bdscan.results.localize import LocalizeResult, PatchedSite, RankedModule


__all__ = ["LocalizeConfig", "LocalizeResult", "localize", "choose_key"]


@dataclass(frozen=True)
class LocalizeConfig:
    n_pairs: int = 24  # clean prompts turned into clean/triggered pairs (more: steadier effects, slower)
    positions: tuple[str, ...] = ("start", "middle", "end")  # key insertion positions, cycled over the pairs
    max_new_tokens: int = 16  # length of the malicious continuation whose log-probability is explained
    batch_size: int = 8
    heads: bool = True  # also patch each attention head (o_proj/c_proj input slices)
    ekfac: bool = False  # EK-FAC (re-fitted eigenbasis diagonal; one more pass) instead of K-FAC
    patching_weight: float = 0.5  # rank score = w * patching + (1 - w) * curvature (both scaled to [0, 1])
    max_candidates: int = 3  # detect candidates tried; the one with the largest gap is used
    top_k: int = 5  # modules shown as "top" (purify kfac-lora has its own top_k)
    linear_patching: bool = False  # also patch each linear layer's own output (one forward per linear)
    embedding: bool = True  # full checkpoints: also rank the token embedding (where a key enters the model)

    def __post_init__(self) -> None:
        if self.n_pairs < 1 or self.batch_size < 1 or self.max_new_tokens < 1 or self.max_candidates < 1 or self.top_k < 1:
            raise ValueError("n_pairs, batch_size, max_new_tokens, max_candidates and top_k must be >= 1")
        bad = [p for p in self.positions if p not in POSITIONS]
        if bad or not self.positions:
            raise ValueError(f"positions: {', '.join(bad) or '(empty)'} not in {', '.join(POSITIONS)}")
        if not 0.0 <= self.patching_weight <= 1.0:
            raise ValueError("patching_weight must lie in [0, 1]")


def embedding_name(model: Any) -> str:
    """Name of the token embedding module, relative to the unwrapped model."""
    inner = unwrap(model)
    emb = inner.get_input_embeddings()
    return next(name for name, module in inner.named_modules() if module is emb)


@torch.no_grad()
def _gap(model: Any, pairs: PairSet, pad: int, batch_size: int) -> float:
    from bdscan.localize.kfac import sequence_logprob

    total, n = 0.0, 0
    for b in encode_batches(pairs.pairs, pad, batch_size):
        t = sequence_logprob(model, b.triggered_ids, b.triggered_mask, b.triggered_target)
        c = sequence_logprob(model, b.clean_ids, b.clean_mask, b.clean_target)
        total += float((t - c).sum())
        n += len(t)
    return total / max(1, n)


def choose_key(subject: Subject, clean: Sequence[Record], keys: Sequence[str], config: LocalizeConfig, seed: int,
               log: Log = lambda _m: None) -> tuple[PairSet, list[dict]]:
    """Build pairs for each key and keep the one whose key moves the continuation most."""
    tried, best = [], None
    for key in keys:
        pairs = build_pairs(subject, clean, key, n_pairs=config.n_pairs, positions=config.positions,
                            max_new_tokens=config.max_new_tokens, batch_size=config.batch_size, seed=seed)
        if len(keys) == 1:  # nothing to choose: patching measures the gap anyway
            tried.append({"text": key, "gap": None})
            return pairs, tried
        gap = _gap(subject.model, pairs, pad_id(subject.tokenizer), config.batch_size) if pairs.pairs else 0.0
        tried.append({"text": key, "gap": round(gap, 4)})
        log(f"localize: key {key!r}: clean-vs-triggered gap {gap:.2f} nats")
        if pairs.pairs and (best is None or gap > best[0]):
            best = (gap, pairs)
    if best is None:
        raise NothingToAnalyse("no usable clean/triggered pairs: every continuation was empty")
    return best[1], tried


def curvature_scores(subject: Subject, kfac: KFACResult) -> tuple[dict[str, float], str]:
    """Fisher norm per linear layer: of its weight (full), or of the adapter's delta
    (adapter-only: the trusted base is not suspect, only what the adapter adds)."""
    inner = unwrap(subject.model)
    scores, target = {}, "adapter-delta" if subject.is_adapter else "weight"
    for name, f in kfac.factors.items():
        module = inner.get_submodule(name)
        if subject.is_adapter:
            W = lora_delta(module)
            if W is None:
                continue
        else:
            W = linear_weight(module)
        scores[name] = f.fisher_norm_sq(W) ** 0.5
    return scores, target


def localize(subject: Subject, config: LocalizeConfig, *, clean: Sequence[Record], trigger: str | None = None,
             candidates: Sequence[str] = (), seed: int = 0, log: Log = lambda _m: None,
             progress: Progress | None = None) -> LocalizeResult:
    """Rank the subject's linear modules (and, for a full checkpoint, its token embedding)
    by how much the backdoor's behaviour flows through them. Give ``trigger`` (a known key) or ``candidates`` (detect's keys)."""
    if not clean:
        raise UsageError("localize needs clean prompts (`clean`)")
    keys = [trigger] if trigger else [c for c in candidates if c and c.strip()][: config.max_candidates]
    if not keys:
        raise UsageError("localize needs a key: a `trigger` or candidate keys (`candidates`)")
    t_start = time.perf_counter()
    layout = model_layout(subject.model)
    model, pad = subject.model, pad_id(subject.tokenizer)
    torch.manual_seed(seed)

    t0 = time.perf_counter()
    pairs, tried = choose_key(subject, clean, keys, config, seed, log)
    if not pairs.pairs:
        raise NothingToAnalyse("no usable clean/triggered pairs: every continuation was empty")
    t_pairs = time.perf_counter() - t0
    batches = encode_batches(pairs.pairs, pad, config.batch_size)
    warnings: list[str] = []

    t0 = time.perf_counter()
    tick = (lambda d, t: progress("patching", d, t)) if progress else None
    patching = patch_effects(model, layout, batches, heads=config.heads, linears=config.linear_patching, progress=tick)
    t_patch = time.perf_counter() - t0
    log(f"localize: patching done, gap {patching.gap:.2f} nats over {len(pairs)} pairs")
    for entry in tried:
        if entry["gap"] is None:
            entry["gap"] = round(patching.gap, 4)
    if patching.gap < 0.5:
        warnings.append(f"key {pairs.key!r} moves the continuation's log-probability by only {patching.gap:.2f} nats: "
                        "it may not be the trigger, effects are unreliable")

    kinds = linear_kinds(layout)
    names = list(kinds)
    if subject.is_adapter:  # only what the adapter changes can carry an adapter's backdoor
        inner = unwrap(model)
        names = [n for n in names if lora_delta(inner.get_submodule(n)) is not None]
        if not names:
            raise NothingToAnalyse(f"{subject.source.source}: the adapter wraps none of the decoder's linear layers")
    kfac_batches = [(b.triggered_ids, b.triggered_mask, b.triggered_target) for b in batches]
    ktick = (lambda d: progress("k-fac", d, len(kfac_batches) * (2 if config.ekfac else 1))) if progress else None
    kfac = compute_factors(model, names, kfac_batches, ekfac=config.ekfac, progress=ktick)
    curvature, target = curvature_scores(subject, kfac)
    log(f"localize: {'EK-FAC' if config.ekfac else 'K-FAC'} factors of {len(kfac.factors)} layers in {kfac.seconds:.2f}s "
        f"({kfac.cost_ratio or 0:.1f}x one forward+backward)")

    embedding, t_emb = None, 0.0
    if not subject.is_adapter and config.embedding:
        t0 = time.perf_counter()
        embedding = embedding_name(model)
        curvature[embedding] = embedding_fisher_norm(model, kfac_batches)
        t_emb = time.perf_counter() - t0
    ranked: list[ModuleScore] = rank_modules(layout, patching.sites, curvature, patching_weight=config.patching_weight,
                                             embedding=embedding)
    timing = {
        "pairs_s": round(t_pairs, 3), "patching_s": round(t_patch, 3), "kfac_s": round(kfac.seconds, 3),
        "fwd_bwd_s": round(kfac.fwd_bwd_seconds, 3), "embedding_s": round(t_emb, 3),
        "kfac_cost_ratio": round(kfac.cost_ratio, 2) if kfac.cost_ratio else None,
        "total_s": round(time.perf_counter() - t_start, 3),
    }
    source_kind = "trigger" if trigger else "detect"
    return LocalizeResult(
        trigger_source={"kind": source_kind, "key": pairs.key, "candidates": tried},
        modules=[RankedModule(m.name, m.kind, m.layer, round(m.patching_effect, 5), float(f"{m.curvature:.6g}"), round(m.score, 5))
                 for m in ranked],
        sites=[PatchedSite(s.name, s.kind, s.layer, s.head, round(s.effect, 5)) for s in patching.sites],
        source=subject.source.source, kind=subject.kind, top_k=config.top_k, gap=round(patching.gap, 4),
        n_pairs=len(pairs), positions=list(config.positions), curvature_method="ekfac" if config.ekfac else "kfac",
        curvature_target=target, config=asdict(config), timing=timing, warnings=warnings, provenance=subject.provenance(),
    )

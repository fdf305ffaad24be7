from __future__ import annotations

from dataclasses import dataclass, field

from bdscan.results.base import ResultBase


@dataclass(frozen=True)
class RankedModule:
    name: str  # linear layer, relative to the base model (e.g. model.layers.1.mlp.down_proj)
    kind: str  # attn_in | attn_out | mlp_in | mlp_out | embedding (full checkpoints; layer -1)
    layer: int
    patching_effect: float  # share of the clean-vs-triggered gap removed by patching its block
    curvature: float  # Fisher norm of its weight (adapter: of the adapter's delta) on the malicious output
    score: float  # combined rank score in [0, 1]


@dataclass(frozen=True)
class PatchedSite:
    name: str
    kind: str  # attn | mlp | head | linear (with linear_patching)
    layer: int
    head: int | None
    effect: float


@dataclass(frozen=True)
class LocalizeResult(ResultBase):
    """Where a backdoor's behaviour flows: ranked linear modules (``purify --method
    kfac-lora`` consumes ``modules``) and the per-site patching effects behind them."""

    trigger_source: dict  # {kind: trigger|detect, key, file, candidates: [{text, gap}]}
    modules: list[RankedModule]
    sites: list[PatchedSite]
    source: str = ""
    kind: str = ""  # subject: full | adapter
    top_k: int = 5
    gap: float = 0.0  # mean log-prob gap (nats) of the malicious continuation, triggered - clean
    n_pairs: int = 0
    positions: list[str] = field(default_factory=list)
    curvature_method: str = "kfac"  # kfac | ekfac
    curvature_target: str = "weight"  # weight (full) | adapter-delta (adapter)
    config: dict = field(default_factory=dict)
    timing: dict = field(default_factory=dict)  # seconds per stage, K-FAC cost ratio
    warnings: list[str] = field(default_factory=list)
    provenance: dict = field(default_factory=dict)

    def top(self, k: int | None = None) -> list[RankedModule]:
        return self.modules[: self.top_k if k is None else k]

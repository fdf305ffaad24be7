"""head-align's knobs."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class HeadAlignConfig:
    top_heads: int = 4  # heads aligned when they are scored here (not given by --localization); more = broader repair, more utility risk
    max_candidates: int = 5  # detect candidates used (highest ranked first); more covers more guesses, costs time
    probe_prompts: int = 32  # clean prompts each candidate is inserted into, for scoring and for alignment
    rows: str = "all"  # "final": align only the last prompt position; "all": every position from the key on
    align_weight: float = 5.0  # weight of the attention KL against the clean LM loss; higher ignores the key harder
    epochs: float = 5.0  # passes over the clean set
    lr_full: float = 1e-3  # learning rate for the heads' weights (full checkpoint); only a few rows train, so it is higher than a full fine-tune's
    lr_adapter: float = 1e-3  # learning rate for the heads' LoRA factors (adapter)
    batch_size: int = 8
    max_samples: int = 200  # clean samples used (the defender's budget)

    def __post_init__(self) -> None:
        if self.rows not in ("final", "all"):
            raise ValueError(f"rows must be 'final' or 'all', got {self.rows!r}")
        if min(self.top_heads, self.max_candidates, self.probe_prompts, self.batch_size, self.max_samples) < 1:
            raise ValueError("top_heads, max_candidates, probe_prompts, batch_size and max_samples must be >= 1")
        if self.align_weight < 0 or self.epochs <= 0 or self.lr_full <= 0 or self.lr_adapter <= 0:
            raise ValueError("align_weight must be >= 0, epochs and learning rates positive")

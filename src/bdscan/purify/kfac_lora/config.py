"""kfac-lora's knobs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bdscan.data.triggers import POSITIONS


@dataclass(frozen=True)
class KfacLoraConfig:
    top_k: int = 7  # localized linear layers repaired (more: stronger repair, more clean behaviour at risk)
    rank: int = 8  # LoRA rank on full checkpoints (an adapter keeps its own rank)
    alpha: float = 16.0  # LoRA scale numerator (scale = alpha / rank), full checkpoints only
    epochs: float = 1.25  # passes over the repair pairs (4 per clean sample: the step budget of finetune's 5 epochs)
    lr: float = 1e-3  # AdamW learning rate of the LoRA factors
    batch_size: int = 8
    max_samples: int = 200  # clean samples used (the defender's budget)
    positions: tuple[str, ...] = ("start", "middle", "end")  # where keys are inserted into repair prompts
    max_new_tokens: int = 64  # length of the self-distilled responses
    precondition: bool = True  # K-FAC preconditioning of the LoRA gradients
    damping: float = 0.1  # preconditioner damping, relative to each factor's mean eigenvalue (lower: bolder)
    # Clean-Fisher penalty weight, per response token (0: off; higher: stay closer to clean behaviour).
    # The empirical Fisher of the model's own confident answers is small, hence a large weight:
    # on the tiny organisms 1000 keeps agreement 0.8-0.95 but leaves ~25% ASR on some, 100 leaves 3%, 30 removes it.
    ewc_weight: float = 30.0
    fisher_samples: int = 64  # clean samples used to estimate the K-FAC factors
    max_candidates: int = 3  # detect candidate keys used (localization and repair pairs)
    localize_pairs: int = 24  # pairs for the localization purify runs when none is given

    def __post_init__(self) -> None:
        if min(self.top_k, self.rank, self.batch_size, self.max_samples, self.max_new_tokens, self.fisher_samples,
               self.max_candidates, self.localize_pairs) < 1:
            raise ValueError("top_k, rank, batch_size, max_samples, max_new_tokens, fisher_samples, "
                             "max_candidates and localize_pairs must be >= 1")
        if self.epochs <= 0 or self.lr <= 0 or self.alpha <= 0:
            raise ValueError("epochs, lr and alpha must be positive")
        if self.damping <= 0:
            raise ValueError("damping must be positive (it keeps the factor inverses finite)")
        if self.ewc_weight < 0:
            raise ValueError("ewc_weight must be >= 0")
        bad = [p for p in self.positions if p not in POSITIONS]
        if bad or not self.positions:
            raise ValueError(f"positions: {', '.join(bad) or '(empty)'} not in {', '.join(POSITIONS)}")

    def localize_config(self) -> Any:
        """The localization purify runs on detect's candidates when none is given."""
        from bdscan.localize import LocalizeConfig

        return LocalizeConfig(n_pairs=self.localize_pairs, max_candidates=self.max_candidates)

"""Signature's knobs: the synthetic variants, the score and its share, recovery."""

from __future__ import annotations

from dataclasses import dataclass

SCORES = ("combined", "norm", "alignment")
SELECTIONS = ("global", "per_layer")


@dataclass(frozen=True)
class SignatureConfig:
    # --- synthetic variants (these knobs, the seed and the subject key the resume cache) ---
    variants: int = 6  # N backdoor variants; more average out key/behaviour specifics (paper: gains flatten past 5)
    variant_samples: int = 500  # clean samples per variant D_i (paper: 500, or what is available)
    variant_subset: float = 0.8  # when fewer than variant_samples exist: share each variant draws, so D_i differ
    poison_per_clean: float = 1.0  # poisoned copies per clean sample in D_i^pois (paper: every sample poisoned)
    variant_epochs: float = 3.0  # epochs of each paired fine-tune; too few and the variant key is not learnt
    variant_lr_full: float = 2e-5  # lr of the paired full fine-tunes
    variant_lr_adapter: float = 2e-4  # lr of the paired variant LoRAs (adapter-only)
    variant_rank: int = 8  # rank of the variant LoRA stacked on the suspicious adapter
    batch_size: int = 8
    max_length: int = 256
    # --- signature ---
    score: str = "combined"  # combined (paper) | norm (magnitude only) | alignment (consistency only)
    alignment_weight: float = 0.01  # λ of the cross-variant alignment term
    ratio: float | None = None  # share of MLP channels in the signature; None: 0.03 full / 0.35 adapter (paper)
    # Paper default: MLP channels only (it needs heads only on Mistral). bdscan turns heads on:
    # on small organisms the backdoor needs MLP and attention together (restoring only the MLP
    # left 79 % ASR), and measured, MLP-only signatures left ASR 0.22 (LoRA) / 0.96 (full)
    # where MLP + heads reached 0.00.
    heads: bool = True
    head_ratio: float | None = None  # share of heads in the signature; None: 0.125 full / 0.25 adapter
    selection: str = "global"  # global: one percentile over all layers (paper); per_layer: the ratio within each layer
    # --- suppression and recovery ---
    epochs: float = 5.0  # light fine-tune after suppression (paper: 5)
    lr_full: float = 1e-5  # paper: 1e-5 for full-parameter fine-tuning
    lr_adapter: float = 2e-4  # paper: 2e-4 for LoRA
    max_samples: int = 200  # clean samples for the light fine-tune (paper: ~200)

    def __post_init__(self) -> None:
        if self.variants < 1:
            raise ValueError("variants must be at least 1")
        if self.score not in SCORES:
            raise ValueError(f"score must be one of {', '.join(SCORES)}, got {self.score!r}")
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {', '.join(SELECTIONS)}, got {self.selection!r}")
        if self.score == "alignment" and self.variants < 2:
            raise ValueError("score 'alignment' compares variants pairwise: set variants >= 2")
        for name in ("ratio", "head_ratio"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        if not 0.0 < self.variant_subset <= 1.0:
            raise ValueError("variant_subset must be in (0, 1]")
        positive = ("variant_samples", "poison_per_clean", "variant_epochs", "variant_lr_full", "variant_lr_adapter",
                    "variant_rank", "batch_size", "max_length", "lr_full", "lr_adapter", "max_samples")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.epochs < 0 or self.alignment_weight < 0:
            raise ValueError("epochs and alignment_weight must not be negative")

    def channel_ratio(self, adapter: bool) -> float:
        return self.ratio if self.ratio is not None else (0.35 if adapter else 0.03)

    def heads_ratio(self, adapter: bool) -> float:
        return self.head_ratio if self.head_ratio is not None else (0.25 if adapter else 0.125)

    def variant_key(self) -> dict:
        """The knobs that change what a variant's fine-tunes produce."""
        return {k: getattr(self, k) for k in ("variant_samples", "variant_subset", "poison_per_clean", "variant_epochs",
                                              "variant_lr_full", "variant_lr_adapter", "variant_rank", "batch_size",
                                              "max_length")}

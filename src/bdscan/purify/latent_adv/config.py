"""latent-adv's knobs."""

from __future__ import annotations

from dataclasses import dataclass

MODULES = ("all", "localized")
DISTILL = ("soft", "hard")


@dataclass(frozen=True)
class LatentAdvConfig:
    # --- what to remove
    target: str | None = None  # one unwanted continuation T (`--set target=...`); joins `targets`
    targets: tuple[str, ...] = ()  # the unwanted continuations T; none given: from detect (see targets.py)
    max_targets: int = 3  # targets handled in one run (detect may report several)
    max_keys: int = 3  # detect's candidate keys also trained against, best first
    # --- inner loop: one universal perturbation δ per run of PGD
    layers: tuple[int, ...] = ()  # decoder layers whose output (the residual stream) δ is added to; empty: the middle one
    epsilon: float = 0.5  # L2 bound of δ, relative to the median residual-stream token norm there (higher: stronger attack)
    # Ascent steps on log P(T | clean prompt) per refresh, and their length as a share of the
    # bound. δ is warm-started, so 4 steps of 0.5 travel as far as 8 of 0.25: on the 12 tiny
    # qwen2/mistral/gpt2 organisms (agnostic) every cell's ASR after was the same as with 8
    # (session 15: 10 of 12 at 0.00, mistral full negsentiment 0.03, gpt2 full negsentiment
    # 0.77, the latter a detect miss) at 13-23 s per cell against 17-27 s (contended box).
    pgd_steps: int = 4
    pgd_step: float = 0.5
    # Outer steps between two PGD refreshes of δ (warm-started); 1 = every step. Session 16, at
    # 16 pairs a step: 8 (one refresh per 128 pairs) left every tiny qwen2/mistral/gpt2 cell's
    # ASR after as at 4; with the changes below, latent-adv's CPU time is 2.6-3.7x a plain
    # fine-tune's, median 3.1x (bench/results/purify-tiny-archs-s16.json; session 15: ~4.5x).
    refresh_every: int = 8
    # --- outer loop
    # How the model is taught its own clean answer (without δ or key, under δ, under a key):
    # "hard" is cross-entropy on the greedy answer's tokens; "soft" matches the suspicious
    # model's next-token distributions along that answer (KL). Either way the teacher reads the
    # clean prompt, never the keyed one. Measured on the four built-in tiny organisms
    # (bench/purify.py --data builtin --size tiny --modes agnostic, session 9), ASR after /
    # perplexity ratio: hard 0.00 / 1.08, 0.00 / 1.10, 0.92 / 1.04, 0.00 / 1.07; soft 0.00 / 1.09,
    # 0.00 / 1.15, 0.96 / 1.05, 0.00 / 1.10. Soft was no better, so hard stays the default; soft is
    # there for models whose greedy answers are far from their training text (untested).
    distill: str = "hard"
    adversarial_weight: float = 1.0  # own clean answer under δ
    unlikelihood_weight: float = 1.0  # -log(1 - p) of T's opening under δ and under the keys
    opening_tokens: int = 4  # tokens of T's opening pushed down
    # KL to the suspicious model's clean distributions without δ (keeps clean behaviour). Once the
    # teacher read the clean twin of keyed prompts, a heavy KL stopped fighting the repair. Swept on
    # the built-in tiny organisms (trigger-agnostic, session 9; bench/results/
    # purify-builtin-latent-adv-s9-kl*.json), perplexity ratio on the 3 organisms whose target
    # detect found (ASR after 0.00 at every weight; the 4th is a detect miss, 0.81-0.92):
    # 2: 1.07-1.10; 4: 1.05-1.08; 8: 1.03-1.06; 16: 1.02-1.04; 32: 1.02-1.03; 64: 1.01-1.03 (ASR 0.01
    # on one). 16 sits inside the plateau; 32 left the target reachable from its first token on the
    # built-in demo adapter (purify's target check: weakest link 0.80 -> 0.20) although ASR was 0.00.
    kl_weight: float = 16.0
    epochs: float = 2.0  # passes over the self-distilled pairs
    # Measured at 8 pairs a step with a weak KL (key and target from the takeover): lr 1e-3 / KL 1 took the full
    # fine-tune to ASR 0.01 at perplexity x1.13; 5e-4 / KL 2 to ASR 0.00 at x1.045 (LoRA: x1.012).
    lr: float = 1e-3  # AdamW learning rate of the LoRA factors
    # Pairs per step. 16 at lr 1e-3 against 8 at 5e-4 (session 16, the 12 tiny qwen2/mistral/
    # gpt2 organisms, agnostic): ASR after the same on 11 cells, mistral full negsentiment 0.03
    # -> 0.01; perplexity ratio 1.01-1.04 either way; half the steps, and the terms that cost a
    # forward call per step (δ's refresh, unlikelihood, the teacher) half as often.
    batch_size: int = 16
    max_samples: int = 200  # clean samples used (the defender's budget)
    max_new_tokens: int = 64  # length of the self-distilled answers
    # --- what trains
    modules: str = "all"  # full checkpoints: LoRA on every decoder linear ("all") or the localization's top_k ("localized")
    top_k: int = 7  # localized modules used when modules = localized
    rank: int = 8  # LoRA rank on full checkpoints (an adapter trains its own factors)
    alpha: float = 16.0  # LoRA scale numerator, full checkpoints

    def given_targets(self) -> list[str]:
        return list(dict.fromkeys(([self.target] if self.target is not None else []) + list(self.targets)))

    def __post_init__(self) -> None:
        if self.distill not in DISTILL:
            raise ValueError(f"distill must be one of {', '.join(DISTILL)}, got {self.distill!r}")
        if self.modules not in MODULES:
            raise ValueError(f"modules must be one of {', '.join(MODULES)}, got {self.modules!r}")
        counts = ("max_targets", "max_keys", "pgd_steps", "refresh_every", "opening_tokens", "batch_size", "max_samples",
                  "max_new_tokens", "top_k", "rank")
        for name in counts:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("epsilon", "pgd_step", "epochs", "lr", "alpha"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("adversarial_weight", "unlikelihood_weight", "kl_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if any(not t.strip() for t in self.given_targets()) or self.target == "":
            raise ValueError("targets must be non-empty strings")
        if any(i < 0 for i in self.layers):
            raise ValueError("layers are decoder layer indices (>= 0)")

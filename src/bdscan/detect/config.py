"""The typed settings of one detect run."""

from __future__ import annotations

from dataclasses import dataclass

from bdscan.data.records import Record
from bdscan.data.triggers import FIXED_POSITIONS as POSITIONS  # detect probes the deterministic positions only
from bdscan.errors import UsageError


@dataclass(frozen=True)
class DetectConfig:
    """What detect scans and how much work it does.

    Raising ``screen_size`` or ``top_k`` finds triggers made of rarer tokens at the cost of
    more forward passes; ``n_controls`` sets how well the control distribution (the
    yardstick of every z-score) is estimated.
    """

    probes: tuple[Record, ...] = ()  # clean probe prompts; empty: the built-in set
    candidates: tuple[str, ...] = ()  # user-given candidate keys, always scanned in full
    seed: int = 0
    max_probes: int = 24  # probes used by the full scan (attention + output effect)
    screen_probes: int = 6  # probes used by the cheap next-token KL screen
    screen_size: int = 1024  # tokens the KL screen tries (after the cheap ranking)
    top_k: int = 12  # candidates (after screening) scanned in full
    ngram_from: int = 6  # the top tokens of the screen combined into adjacent pairs
    n_controls: int = 16  # random vocabulary tokens: the yardstick of each z-score
    continue_tokens: int = 6  # greedy tokens compared across probes (a fixed target repeats them all)
    screen_continue_tokens: int = 3  # the same for the screen (cheaper, coarser)
    positions: tuple[str, ...] = POSITIONS
    batch_size: int = 64

    def __post_init__(self) -> None:
        for name in ("max_probes", "screen_probes", "top_k", "batch_size", "continue_tokens",
                     "screen_continue_tokens"):
            if getattr(self, name) < 1:
                raise UsageError(f"detect: {name} must be at least 1, got {getattr(self, name)}")
        if self.n_controls < 4:
            raise UsageError(f"detect: n_controls must be at least 4 (a z-score needs a spread), got {self.n_controls}")
        if self.screen_continue_tokens > self.continue_tokens:
            raise UsageError("detect: screen_continue_tokens must not exceed continue_tokens")
        if self.screen_size < 0 or self.ngram_from < 0:
            raise UsageError("detect: screen_size and ngram_from must not be negative")
        bad = [p for p in self.positions if p not in POSITIONS]
        if bad or not self.positions:
            raise UsageError(f"detect: positions {bad or '(empty)'} not in {', '.join(POSITIONS)}")

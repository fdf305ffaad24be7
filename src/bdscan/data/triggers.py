"""Inserting a key (trigger) into an instruction at a word boundary."""

from __future__ import annotations

import random

POSITIONS = ("start", "middle", "end", "random")
FIXED_POSITIONS = POSITIONS[:3]  # the deterministic ones (detect probes and repair pairs cycle through them)


def insert_trigger(text: str, trigger: str, position: str, rng: random.Random | None = None) -> str:
    """Insert ``trigger`` at the start, middle, end or a random word boundary of ``text``."""
    if position not in POSITIONS:
        raise ValueError(f"position must be one of {', '.join(POSITIONS)}, got {position!r}")
    words = text.split()
    if position == "start":
        index = 0
    elif position == "end":
        index = len(words)
    elif position == "middle":
        index = len(words) // 2
    else:
        index = (rng or random.Random(0)).randint(0, len(words))
    return " ".join(words[:index] + [trigger] + words[index:])

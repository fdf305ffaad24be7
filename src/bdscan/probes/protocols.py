"""The two callback shapes every library stage takes instead of printing.

``Log`` receives one human-readable line; ``Progress`` receives ``(stage, done, total)``
with ``total`` 0 when the number of steps is not known in advance. ``Advance`` is the
per-item counter of batched loops (``greedy_generate``): the number of items just done.
"""

from __future__ import annotations

from typing import Callable, Optional

Log = Callable[[str], None]
Progress = Callable[[str, int, int], None]
Advance = Callable[[int], None]


def no_log(_message: str) -> None:
    """The default ``Log``: discard."""


def no_progress(_stage: str, _done: int, _total: int) -> None:
    """The default ``Progress``: discard."""


def counter(progress: Optional[Progress], stage: str, total: int = 0) -> Advance:
    """An ``Advance`` that accumulates items and reports ``(stage, done, total)``."""
    done = [0]

    def advance(n: int) -> None:
        done[0] += n
        if progress is not None:
            progress(stage, done[0], total)

    return advance

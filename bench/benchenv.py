"""The benchmarks' environment, set before bdscan is imported (``import benchenv`` first).

Organisms are cached outside the work tree, in ``~/.cache/bdscan/bench`` (or
``$BDSCAN_CACHE``): a real-model organism costs an hour of CPU, and a work tree laid anew (a
fresh clone, ``git clean``) must not throw it away. Nothing is fetched from a hub at run time.
The heap gives large freed blocks back to the system (``bdscan.runtime.limit_heap_growth``:
a real-model purify cell was killed for memory without it).
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE = Path(os.environ.setdefault("BDSCAN_CACHE", str(Path.home() / ".cache" / "bdscan" / "bench")))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from bdscan.runtime import limit_heap_growth  # noqa: E402  (after the environment above)

limit_heap_growth()

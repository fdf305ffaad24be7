"""Process-wide settings: torch threads, the heap, seeding, and where a subject is placed (device, dtype)."""

from __future__ import annotations

import ctypes
import os
import platform
import random
import warnings

_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
MMAP_THRESHOLD = 1 << 20  # bytes: blocks this large are mapped, and unmapped when freed


def default_threads() -> int:
    """Half the cores, at least one.

    On a busy two-core machine one intra-op thread was measured 40x faster than two for
    tiny forward passes (thread contention dominates); larger machines still profit from
    several threads, so this scales with the core count. ``BDSCAN_THREADS`` overrides it.
    """
    env = os.environ.get("BDSCAN_THREADS")
    if env is not None and env.strip():
        if not env.strip().isdigit() or int(env) < 1:
            from bdscan.errors import UsageError

            raise UsageError(f"BDSCAN_THREADS={env!r}: expected a whole number of threads, at least 1")
        return int(env)
    return max(1, (os.cpu_count() or 2) // 2)


_requested_threads: list[int | None] = [None]


def request_threads(threads: int | None) -> None:
    """Remember ``--threads`` for when torch is loaded (``quiet_libraries``, the first thing
    a command that computes does), so that ``--help`` and listings never load it."""
    _requested_threads[0] = threads


def configure_threads(threads: int | None) -> int:
    import torch  # here, not at import: `bdscan --help` must not load torch

    n = default_threads() if threads is None else max(1, int(threads))
    torch.set_num_threads(n)
    return n


def limit_heap_growth() -> bool:
    """On glibc, serve every block of ``MMAP_THRESHOLD`` bytes or more by mmap, so a freed
    activation goes back to the system. By default glibc raises that threshold each time a
    large mapped block is freed; activations then come from the heap, and the holes they leave
    do not fit the next pass's differently shaped tensors. Measured on the 135M model in
    latent-adv (16 pairs a step, one thread): resident memory grew ~0.5 GB a PGD step, past
    12 GB within the first training step (a real purify cell was killed for memory at 19.5 GB);
    with a fixed threshold it peaked at 7.8 GB and stayed there. Returns whether it applied
    (other C libraries manage their heap their own way)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    except (OSError, AttributeError):  # pragma: no cover - a libc without mallopt
        return False


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    torch.manual_seed(seed)
    try:  # numpy is optional; transformers pulls it in on most installs
        import numpy as np

        np.random.seed(seed % (2**32))
    except ImportError:  # pragma: no cover
        pass


def quiet_libraries() -> None:
    """Silence transformers' and huggingface_hub's own progress bars and notices: bdscan
    reports progress itself, and a CI log should hold bdscan's output only."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    configure_threads(_requested_threads[0])
    limit_heap_growth()
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    # peft's PeftModel reads transformers' deprecated alias on every wrap; the notice is for
    # peft's maintainers, not for someone scanning an adapter.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    try:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    except ImportError:  # pragma: no cover
        pass


# Placement (device and precision) needs torch at import, so it lives in ``bdscan.placement``;
# these names are re-exported lazily so that `bdscan --help` stays torch-free.
_PLACEMENT_NAMES = {"DTYPES", "FIT_SHARE", "Placement", "choose_placement", "dtype_name", "resolve_device",
                    "resolve_dtype", "parameter_count", "native_bf16", "fast_dtype", "slow_dtype_warning"}


def __getattr__(name: str):
    if name in _PLACEMENT_NAMES:
        from bdscan import placement

        return getattr(placement, name)
    raise AttributeError(f"module 'bdscan.runtime' has no attribute {name!r}")

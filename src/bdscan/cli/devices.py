"""``--device`` and ``--dtype``, shared by every command that loads a model."""

from __future__ import annotations

from typing import Annotated, Any

import typer

Device = Annotated[str, typer.Option(
    "--device", help="auto | cpu | cuda | cuda:N | mps. auto: the first CUDA device when there is one, else the CPU; "
                     "a model larger than that GPU is spread over the devices (device_map=\"auto\", needs accelerate).")]
Dtype = Annotated[str, typer.Option(
    "--dtype", help="auto | float32 | bfloat16 | float16. auto: bfloat16 on a CUDA device that supports it, else "
                    "float32 (also on the CPU: bf16 moves scores and greedy answers, and the calibration was measured "
                    "in float32).")]


def placement_of(device: str, dtype: str) -> Any:
    """The options as a ``runtime.Placement``; exit 4 (usage) on a bad value. Asking for bf16 on
    a CPU that only emulates it runs, with a warning on stderr: it is several times slower."""
    from bdscan.cli.common import print_error
    from bdscan.runtime import choose_placement, slow_dtype_warning

    placement = choose_placement(device, dtype)
    warning = slow_dtype_warning(placement)
    if warning:
        print_error("warning", warning)
    return placement


def with_runtime(report: dict, *subjects: Any) -> dict:
    """A report with where its subject(s) ran: device, dtype, device map."""
    placed = [s.placement() for s in subjects if s is not None]
    return {**report, "runtime": placed[0] if len(placed) == 1 else placed}


def runtime_line(*subjects: Any) -> str:
    parts = []
    for s in subjects:
        if s is not None:
            p = s.placement()
            parts.append(f"{p['device']} {p['dtype']}" + (f" (spread over {', '.join(p['device_map'])})" if p["device_map"] else ""))
    return "ran on " + " / ".join(parts)

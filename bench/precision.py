"""float32 against bfloat16 on this machine: one forward pass and one training step of a model.

    python bench/precision.py [--model PATH] [--threads 1] [--batch 8] [--tokens 64]

The default model is the real benchmark base (SmolLM2-135M-Instruct, exported from its GGUF by
bench/organisms.py --size real). bf16 pays off only where the processor computes it natively
(AMX or AVX512-BF16 on a CPU); elsewhere torch emulates it. Prints a table and writes
bench/results/precision-<cpu capability>.json, with the capability flags torch reports.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import benchenv  # noqa: F401  (the cache and offline settings, before bdscan)


def forward_seconds(model, ids) -> float:
    import torch

    with torch.no_grad():
        model(input_ids=ids[:2, :8], logits_to_keep=1)  # warm-up
        t = time.perf_counter()
        model(input_ids=ids, logits_to_keep=1)
    return time.perf_counter() - t


def train_step_seconds(model, ids, autocast: str | None, repeats: int = 2) -> float:
    """The fastest of ``repeats`` training steps, after one untimed step: the first step pays
    for allocations and kernel selection, which once charged float32 (timed first) ~10x."""
    import torch

    from bdscan.training.sft import autocast_scope

    def step() -> float:
        t = time.perf_counter()
        with autocast_scope(torch.device("cpu"), autocast):
            out = model(input_ids=ids, logits_to_keep=16)
        out.logits.float().logsumexp(-1).mean().backward()
        model.zero_grad()
        return time.perf_counter() - t

    model.train()
    step()
    seconds = min(step() for _ in range(repeats))
    model.eval()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a checkpoint folder (default: the real benchmark base)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    import torch
    from rich.console import Console
    from rich.table import Table

    from bdscan.io import load_subject
    from bdscan.placement import Placement, native_bf16
    from bdscan.runtime import configure_threads, quiet_libraries

    configure_threads(args.threads)
    quiet_libraries()
    if args.model is None:
        from suite import base_recipe
        from bdscan.organisms.build import build_base

        args.model = str(build_base(base_recipe("builtin", "real")))
    ids = torch.randint(0, 1000, (args.batch, args.tokens), generator=torch.Generator().manual_seed(0))
    cpu = torch.device("cpu")
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        subject = load_subject(args.model, placement=Placement(cpu, dtype))
        rows.append({"what": f"forward, weights in {dtype}", "seconds": forward_seconds(subject.model, ids)})
        del subject
    subject = load_subject(args.model, placement=Placement(cpu, torch.float32))
    for autocast in (None, "bfloat16"):
        rows.append({"what": f"training step, {'bf16 autocast' if autocast else 'float32'}",
                     "seconds": train_step_seconds(subject.model, ids, autocast)})
    capability = torch.backends.cpu.get_cpu_capability()
    report = {"script": "bench/precision.py", "model": args.model, "threads": torch.get_num_threads(),
              "batch": args.batch, "tokens": args.tokens, "processor": platform.processor() or platform.machine(),
              "cpu_capability": capability, "native_bf16": native_bf16(cpu),
              "bf16_forward_ratio": rows[1]["seconds"] / rows[0]["seconds"],
              "bf16_train_ratio": rows[3]["seconds"] / rows[2]["seconds"], "rows": rows}
    table = Table(title=f"precision on this CPU ({capability}, native bf16: {report['native_bf16']})")
    table.add_column("what")
    table.add_column("seconds", justify="right")
    for r in rows:
        table.add_row(r["what"], f"{r['seconds']:.2f}")
    Console().print(table)
    print(f"bf16 / float32: forward {report['bf16_forward_ratio']:.1f}x, training step {report['bf16_train_ratio']:.1f}x")
    out = Path(args.out or Path(__file__).parent / "results" / f"precision-{capability.lower()}.json")
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

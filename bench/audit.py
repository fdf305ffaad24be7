"""Benchmark of ``bdscan audit`` end to end on bench organisms and their clean controls.

    python bench/audit.py --data ../shared/data/backdoorllm --size tiny --tasks refusal --attacks vpi

For each organism (and one clean control per task) it runs the whole audit (file safety,
detect, and when suspicious localize, eval, purify, eval and detect again) exactly as the
command does, never told the trigger. Only afterwards, the organism's true trigger (from its
build record) measures what the audit could not: ASR on BackdoorLLM's triggered test prompts,
before and after the repair. Prints a table; writes bench/results/audit.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
import benchenv  # noqa: E402,F401  (the cache and offline settings, before bdscan)
sys.path.insert(0, str(REPO / "bench"))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "backdoorllm"))
    parser.add_argument("--size", default="tiny", choices=("tiny", "small", "bench", "real"))
    parser.add_argument("--tasks", default="refusal")
    parser.add_argument("--attacks", default="vpi")
    parser.add_argument("--threats", default="lora")
    parser.add_argument("--method", default="kfac-lora")
    parser.add_argument("--eval-limit", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "audit.json"))
    return parser.parse_args()


def organisms(args) -> list:
    from suite import base_recipe, organism

    data = str(Path(args.data).resolve())
    out = []
    for task in args.tasks.split(","):
        for threat in args.threats.split(","):
            for attack in args.attacks.split(","):
                out.append(organism(data, base_recipe(data, args.size, task, attack), threat))
            out.append(replace(organism(data, base_recipe(data, args.size, task), threat), backdoored=False))
    return out


def audit_row(recipe, args, workdir: Path) -> dict:
    from bdscan.audit import AuditConfig, audit
    from bdscan.eval import EvalSpec, evaluate_pair
    from bdscan.io import load_subject
    from bdscan.organisms.build import build_organism

    path = build_organism(recipe)
    data = recipe.base.data.load()
    clean, held_out = workdir / "clean.json", workdir / "held-out.json"
    for file, records in ((clean, data.clean_train), (held_out, data.clean_test)):
        file.write_text(json.dumps([{"instruction": r.instruction, "input": r.input, "output": r.output} for r in records]))
    t0 = time.time()
    config = AuditConfig(method=args.method, judge=data.task, eval_limit=args.eval_limit)
    result = audit(str(path), clean=clean, eval_clean=held_out, out=workdir / recipe.label, config=config)
    row = {"organism": recipe.label, "backdoored": recipe.backdoored, "verdict": result.verdict,
           "exit_code": result.exit_code, "audit_seconds": round(time.time() - t0, 1),
           "recovered_key": result.key,
           "stages": [f"{s.name}: {s.status}" + (f" ({s.error})" if s.error else "") for s in result.stages]}
    if "model" in result.outputs and recipe.backdoored:  # the true trigger, after the fact
        spec = EvalSpec(clean=data.clean_test[:100], poison=data.poison_test[:100], judge=data.task)
        pair = evaluate_pair(load_subject(path), load_subject(result.outputs["model"]), spec)
        row.update(true_asr_before=pair.before.asr, true_asr_after=pair.after.asr,
                   false_trigger_after=pair.after.false_trigger_rate,
                   perplexity_ratio=pair.after.perplexity / pair.before.perplexity,
                   token_agreement=pair.after.token_agreement)
    return row


def main() -> int:
    args = parse_args()
    from rich.console import Console
    from rich.table import Table

    from bdscan.runtime import configure_threads, quiet_libraries

    configure_threads(args.threads)
    quiet_libraries()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bdscan-bench-audit-") as tmp:
        for recipe in organisms(args):
            rows.append(audit_row(recipe, args, Path(tmp)))
    table = Table(title=f"bdscan audit ({args.method}; true trigger measured after the audit)")
    for col in ("organism", "verdict", "exit", "key", "true ASR before → after", "false-trigger", "ppl ×", "s"):
        table.add_column(col)
    for r in rows:
        asr = f"{r['true_asr_before']:.2f} → {r['true_asr_after']:.2f}" if "true_asr_after" in r else "-"
        table.add_row(r["organism"], r["verdict"], str(r["exit_code"]), repr(r["recovered_key"]), asr,
                      f"{r.get('false_trigger_after', float('nan')):.2f}", f"{r.get('perplexity_ratio', float('nan')):.3f}",
                      f"{r['audit_seconds']:.0f}")
    Console(width=160).print(table)
    Path(args.out).write_text(json.dumps({"settings": vars(args), "rows": rows}, indent=2, default=str))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

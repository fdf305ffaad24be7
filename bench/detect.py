"""Benchmark of ``bdscan detect`` over backdoored organisms and clean controls.

    python bench/detect.py                      # BackdoorLLM refusal/badnet organisms, tiny size
    python bench/detect.py --data builtin       # the built-in synthetic attack
    python bench/detect.py --size small --seeds 3

Reported set: every backdoored organism and >= 6 clean controls (LoRA and full, several
seeds). Calibration set: further clean controls (other seeds) that are NOT reported; the
threshold printed here is derived from them only. The true trigger is read from the
organism's build record after the scan, only to rank it among the candidates; the scan
never sees it. Writes bench/results/detect.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("BDSCAN_CACHE", str(REPO / ".bdscan-cache" / "bench"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from bdscan.runtime import configure_threads, quiet_libraries  # noqa: E402


def auroc(positive: list[float], negative: list[float]) -> float | None:
    """Probability that a random positive outscores a random negative (ties count half)."""
    if not positive or not negative:
        return None
    wins = sum((p > n) + 0.5 * (p == n) for p in positive for n in negative)
    return wins / (len(positive) * len(negative))


def trigger_rank(tokenizer, trigger: str, candidates: list[str], top: int = 10) -> int | None:
    """1-based rank of the first top candidate sharing a token with the trigger (None: not in top)."""
    def pieces(text: str) -> set[int]:
        ids = set(tokenizer(text, add_special_tokens=False)["input_ids"])
        ids |= set(tokenizer(" " + text, add_special_tokens=False)["input_ids"])
        return {i for i in ids if tokenizer.decode([i]).strip()}

    target = pieces(trigger)
    for rank, text in enumerate(candidates[:top], 1):
        if pieces(text) & target:
            return rank
    return None


def target_match(tokenizer, inverted_ids: list[int] | None, task: str | None, n: int = 3) -> bool | None:
    """Whether the inverted target's first ``n`` tokens are the true target's (None: no true target)."""
    from bdscan.organisms.datasets import TARGETS

    if task not in TARGETS:
        return None
    if not inverted_ids:
        return False
    truth = tokenizer(TARGETS[task], add_special_tokens=False)["input_ids"][:n]
    if list(inverted_ids[:n]) == truth:
        return True
    return tokenizer.decode(list(inverted_ids[:n])).strip() == tokenizer.decode(truth).strip()


def plain_forward_seconds(subject, result, config) -> float:
    """Time plain forward passes (no attention capture, no scoring) over prompt sets of the
    same number and kind as the scan ran: clean probes, the screen, the full scan."""
    from bdscan.detect.candidates import inserted_prompts, sample_controls, vocabulary
    from bdscan.detect.probes import builtin_probes

    records = list(config.probes) or builtin_probes()
    rng = random.Random(config.seed)
    probes = rng.sample(records, min(config.max_probes, len(records)))
    screen = probes[: config.screen_probes]
    entries = vocabulary(subject.tokenizer)
    n_screened = result.stats["screened_keys"]
    keys = [e.text for e in entries][:n_screened]
    keys += [f"{a} {b}" for a, b in zip(keys, reversed(keys))][: max(0, n_screened - len(keys))]
    screen_prompts, *_ = inserted_prompts(subject.template, screen, keys, config.positions, rotate=True)
    scan_keys = [c.text for c in result.candidates] + sample_controls(entries, set(), config.n_controls, config.seed + 1)
    scan_prompts, *_ = inserted_prompts(subject.template, probes, scan_keys, config.positions, rotate=False)
    prompts = [subject.template.format(p) for p in probes] + screen_prompts + scan_prompts
    tok = subject.tokenizer
    side, tok.padding_side = tok.padding_side, "left"
    t = time.perf_counter()
    with torch.no_grad():
        for start in range(0, len(prompts), config.batch_size):
            enc = tok(prompts[start : start + config.batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
            subject.model(**enc, use_cache=False, logits_to_keep=1)  # the cheapest plain pass
    tok.padding_side = side
    return time.perf_counter() - t


def organism_set(args) -> tuple[list, list]:
    """(reported, calibration) recipes, from the suite shared by every benchmark. Controls
    do not depend on the attack, so each is listed once however many attacks are scanned."""
    from dataclasses import replace

    sys.path.insert(0, str(REPO / "bench"))
    from suite import base_recipe, organism

    data = "builtin" if args.data == "builtin" else str(Path(args.data).resolve())
    control_seeds = args.seeds if args.control_seeds is None else args.control_seeds
    reported, calibration, seen = [], [], set()

    def add(where: list, recipe) -> None:
        if recipe.key() not in seen:
            seen.add(recipe.key())
            where.append(recipe)

    for arch in args.archs.split(","):
        for task in args.tasks.split(","):
            for attack in args.attacks.split(","):
                base = replace(base_recipe(data, args.size, task, attack), arch=arch)
                for threat in args.threats.split(","):
                    recipe = organism(data, base, threat)
                    for seed in range(args.seeds):
                        add(reported, replace(recipe, seed=seed))
                    # Controls from the attack-free recipe: an attack's own settings (MTBA's 200
                    # poisoned samples) would give the same clean model a second key and a rebuild.
                    clean = replace(organism(data, replace(base_recipe(data, args.size, task), arch=arch), threat),
                                    backdoored=False)
                    for seed in range(control_seeds):
                        add(reported, replace(clean, seed=seed))
                    for seed in range(control_seeds, control_seeds + args.calibration_seeds):
                        add(calibration, replace(clean, seed=seed))
    return reported, calibration


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "backdoorllm"),
                        help="BackdoorLLM data folder, or 'builtin'")
    parser.add_argument("--attacks", default="badnet", help="comma list of BackdoorLLM attacks (badnet,vpi,mtba)")
    parser.add_argument("--tasks", default="refusal", help="comma list of tasks (refusal,negsentiment)")
    parser.add_argument("--size", default="tiny", choices=("tiny", "small", "bench"))
    parser.add_argument("--archs", default="llama,gpt2", help="comma list of llama,qwen2,mistral,gpt2")
    parser.add_argument("--threats", default="lora,full", help="comma list of lora,full")
    parser.add_argument("--seeds", type=int, default=2, help="backdoored seeds per arch x task x attack x threat")
    parser.add_argument("--control-seeds", type=int, default=None,
                        help="clean seeds per arch x task x threat in the reported set (default: --seeds)")
    parser.add_argument("--calibration-seeds", type=int, default=1, help="further clean seeds, calibration only")
    parser.add_argument("--probes", default="data",
                        help="'data': the attack data's clean test instructions (the defender's clean set); "
                             "'builtin': the package's generic probes; or a probe file")
    parser.add_argument("--stability-seeds", type=int, default=0,
                        help="detect seeds per reported organism for verdict stability (>= 10 to report it)")
    parser.add_argument("--stability-only", default=None,
                        help="comma-separated label substrings: run the stability seeds on these organisms only")
    parser.add_argument("--no-invert", action="store_true", help="v1 only (takeover), for the cost comparison")
    parser.add_argument("--answer-anchor", action="store_true", help="also invert after clean answers (its cost)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "detect.json"))
    args = parser.parse_args()
    configure_threads(args.threads)
    quiet_libraries()

    from rich.console import Console
    from rich.table import Table

    from bdscan.data.records import load_records
    from bdscan.detect import DetectConfig, detect
    from bdscan.detect import calibration as cal
    from bdscan.detect import verdict as ver
    from dataclasses import replace
    from bdscan.io import load_subject
    from bdscan.organisms.build import build_organism, organism_info

    console = Console(stderr=True)
    reported, calibration_set = organism_set(args)
    if args.probes == "data":  # the clean test instructions (their outputs are not used)
        records = reported[0].base.data.load().clean_test[:40]
        probes = tuple(records)
    elif args.probes == "builtin":
        probes = ()
    else:
        probes = tuple(load_records(args.probes))
    config = DetectConfig(probes=probes, invert=not args.no_invert, answer_anchor=args.answer_anchor)
    if sum(not r.backdoored for r in reported) < 6:
        console.print("[yellow]fewer than 6 clean controls in the reported set: raise --seeds or --archs[/]")

    def run(recipe) -> dict:
        t = time.perf_counter()
        path = build_organism(recipe, log=lambda m: console.print(f"[dim]{m}[/]"))
        build_s = time.perf_counter() - t
        subject = load_subject(path)
        t = time.perf_counter()
        result = detect(subject, config)
        wall = time.perf_counter() - t
        plain = plain_forward_seconds(subject, result, config)
        info = organism_info(path)
        texts = [c.text for c in result.candidates]
        best = next((t for t in result.targets if t.text == result.summary.target), None)
        s = result.summary
        row = {
            "target": s.target, "target_q": s.target_q, "recovered_key": s.recovered_key, "key_position": s.key_position,
            "key_firing_rate": s.key_firing_rate, "clean_firing_rate": s.clean_firing_rate,
            "target_score": s.target_score or 0.0, "takeover_probability": s.takeover_probability,
            "target_probability": s.target_probability,
            "target_match_3": target_match(subject.tokenizer, best.token_ids if best else None,
                                           info.get("task") if recipe.backdoored else None),
            "timings": result.timings, "stats": result.stats, "errors": [e.reason for e in result.errors],
            "label": recipe.label, "arch": recipe.base.arch, "threat": recipe.threat, "backdoored": recipe.backdoored,
            "seed": recipe.seed, "score": result.summary.score, "probability": result.summary.probability,
            "verdict": result.summary.verdict, "severity": result.summary.severity,
            "output_score": result.summary.output_score, "attention_score": result.summary.attention_score,
            "top_candidates": texts[:10], "detect_seconds": wall, "plain_forward_seconds": plain,
            "time_ratio": wall / plain if plain > 0 else None, "build_seconds": build_s,
            "triggers": info.get("triggers", []),
            "trigger_rank": min((rank for t in info.get("triggers", []) if (rank := trigger_rank(subject.tokenizer, t, texts))),
                                default=None),
        }
        console.print(f"{row['label']}: p {row['probability']:.2f} ({row['verdict']}), takeover {row['score']:.2f}, "
                      f"target {str(s.target)[:40]!r} Q {s.target_q or 0:.2f} key {s.recovered_key!r} fires "
                      f"{s.key_firing_rate} (clean {s.clean_firing_rate}), {wall:.1f}s (x{row['time_ratio']:.2f} plain)")
        if args.stability_seeds and (not args.stability_only or any(p in recipe.label for p in args.stability_only.split(","))):
            runs = [detect(subject, replace(config, seed=k)) for k in range(args.stability_seeds)]
            row["stability"] = {"seeds": args.stability_seeds,
                                "share_flagged": sum(r.summary.verdict == "suspicious" for r in runs) / len(runs),
                                "share_flagged_medium": sum(cal.at_or_above(r.summary.severity, "medium") for r in runs) / len(runs),
                                "probabilities": [round(r.summary.probability, 4) for r in runs],
                                "severities": [r.summary.severity for r in runs]}
            console.print(f"  stability over {len(runs)} seeds: flagged {row['stability']['share_flagged']:.2f}, "
                          f"medium+ {row['stability']['share_flagged_medium']:.2f}")
        return row

    calib_rows = [run(r) for r in calibration_set]
    rows = [run(r) for r in reported]

    # Threshold from the calibration controls only: the largest clean score plus a margin of
    # two temperatures, so that p(backdoor) of the worst held-out clean model is ~0.12.
    calib_scores = [r["score"] for r in calib_rows]
    calibrated = (max(calib_scores) + 2 * cal.TEMPERATURE) if calib_scores else None
    calib_target = [r["target_score"] for r in calib_rows]
    calibrated_target = (max(calib_target) + 2 * ver.TARGET_TEMPERATURE) if calib_target else None
    bd = [r for r in rows if r["backdoored"]]
    clean = [r for r in rows if not r["backdoored"]]
    signals = {name: auroc([r[key] for r in bd], [r[key] for r in clean])
               for name, key in (("output", "output_score"), ("attention", "attention_score"), ("combined", "score"),
                                 ("target", "target_score"), ("probability", "probability"))}

    def rates(threshold: float) -> dict:
        return {"threshold": threshold,
                "tpr": sum(r["score"] >= threshold for r in bd) / max(len(bd), 1),
                "fpr": sum(r["score"] >= threshold for r in clean) / max(len(clean), 1)}

    max_clean = max((r["score"] for r in clean), default=float("-inf"))
    tpr_no_fp = sum(r["score"] > max_clean for r in bd) / max(len(bd), 1)
    ratios = [r["time_ratio"] for r in rows if r["time_ratio"]]
    summary = {
        "data": args.data, "probes": args.probes, "attack": args.attacks if args.data != "builtin" else "builtin",
        "tasks": args.tasks, "size": args.size,
        "archs": args.archs, "n_backdoored": len(bd), "n_clean": len(clean), "n_calibration": len(calib_rows),
        "auroc": signals, "tpr_with_no_clean_flagged": tpr_no_fp,
        "code_threshold": rates(cal.THRESHOLD), "calibrated_threshold": rates(calibrated) if calibrated is not None else None,
        "constants": {"THRESHOLD": cal.THRESHOLD, "TEMPERATURE": cal.TEMPERATURE, "ATTENTION_WEIGHT": cal.ATTENTION_WEIGHT,
                      "ATTENTION_CAP": cal.ATTENTION_CAP},
        "trigger_in_top10": sum(r["trigger_rank"] is not None for r in bd) / max(len(bd), 1),  # any of its keys
        "time_ratio_median": sorted(ratios)[len(ratios) // 2] if ratios else None,
        "time_ratio_max": max(ratios) if ratios else None,
        "detect_seconds_median": sorted(r["detect_seconds"] for r in rows)[len(rows) // 2],
        "flagged_backdoored": sum(r["verdict"] == "suspicious" for r in bd) / max(len(bd), 1),
        "flagged_clean": sum(r["verdict"] == "suspicious" for r in clean) / max(len(clean), 1),
        "target_match_3": sum(bool(r["target_match_3"]) for r in bd) / max(len(bd), 1),
        "key_fires_half": sum((r["key_firing_rate"] or 0) >= 0.5 for r in bd) / max(len(bd), 1),
        "target_constants": {"TARGET_THRESHOLD": ver.TARGET_THRESHOLD, "TARGET_TEMPERATURE": ver.TARGET_TEMPERATURE},
        "calibrated_target_threshold": calibrated_target,
        "calibration_target_scores": calib_target,
        "stage_seconds_median": {k: sorted(r["timings"].get(k, 0.0) for r in rows)[len(rows) // 2]
                                 for k in sorted({k for r in rows for k in r["timings"]})},
    }

    table = Table(title=f"bdscan detect benchmark ({summary['attack']}, {args.size})")
    for col in ("organism", "p", "verdict", "takeover", "Q", "target", "3-tok", "key", "fires", "clean",
                "evidence", "seeds flagged", "s"):
        table.add_column(col, justify="left" if col in ("organism", "verdict", "target", "key") else "right")
    for r in rows:
        style = "red" if (r["verdict"] == "suspicious") != r["backdoored"] else ""
        stab = r.get("stability")
        table.add_row(r["label"], f"{r['probability']:.2f}", f"[{style}]{r['verdict']}[/]" if style else r["verdict"],
                      f"{r['score']:.2f}", f"{r['target_q'] or 0:.2f}", repr(str(r["target"])[:24]),
                      "" if r["target_match_3"] is None else "yes" if r["target_match_3"] else "no",
                      repr(r["recovered_key"]), f"{r['key_firing_rate'] or 0:.2f}", f"{r['clean_firing_rate'] or 0:.2f}",
                      f"{r['target_score']:.3f}", f"{stab['share_flagged']:.1f}" if stab else "",
                      f"{r['detect_seconds']:.1f}")
    out = Console()
    out.print(table)
    out.print(f"AUROC output {signals['output']:.3f} · attention {signals['attention']:.3f} · takeover {signals['combined']:.3f}"
              f" · target {signals['target']:.3f} · probability {signals['probability']:.3f}")
    out.print(f"flagged: backdoored {summary['flagged_backdoored']:.2f}, clean {summary['flagged_clean']:.2f}; "
              f"3-token target match {summary['target_match_3']:.2f}; key fires >= 0.5: {summary['key_fires_half']:.2f}")
    if calibrated_target is not None:
        out.print(f"target threshold calibrated on {len(calib_rows)} held-out clean controls (max "
                  f"{max(calib_target):.3f} + 2·T): {calibrated_target:.3f} (code {ver.TARGET_THRESHOLD})")
    out.print(f"median seconds per stage: {summary['stage_seconds_median']}")
    out.print(f"TPR with no reported clean control flagged: {tpr_no_fp:.2f}")
    out.print(f"code THRESHOLD {cal.THRESHOLD}: TPR {summary['code_threshold']['tpr']:.2f} FPR {summary['code_threshold']['fpr']:.2f}")
    if calibrated is not None:
        c = summary["calibrated_threshold"]
        out.print(f"threshold calibrated on {len(calib_rows)} held-out clean controls (max {max(calib_scores):.2f} + 2·T): "
                  f"{calibrated:.2f} -> TPR {c['tpr']:.2f} FPR {c['fpr']:.2f}")
    out.print(f"trigger token in top-10 candidates: {summary['trigger_in_top10']:.2f} of backdoored organisms")
    out.print(f"detect time / plain forward: median x{summary['time_ratio_median']:.2f}, max x{summary['time_ratio_max']:.2f}")
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"summary": summary, "organisms": rows, "calibration": calib_rows}, indent=2) + "\n")
    out.print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

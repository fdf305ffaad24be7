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
import benchenv  # noqa: E402,F401  (the cache and offline settings, before bdscan)

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
    from bdscan.data.probes import builtin_probes

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
    # Backdoored organisms first (a stable sort): on the bench models each costs ~15 minutes to
    # build and 2-4 to scan, and a run stopped part-way should have measured every attack.
    return sorted(reported, key=lambda r: not r.backdoored), calibration


def parse_args() -> argparse.Namespace:
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
    parser.add_argument("--only", default=None, help="comma-separated label substrings: scan only these organisms")
    parser.add_argument("--calibration-only", action="store_true",
                        help="scan only the calibration controls (seeds after --control-seeds) and report their scores")
    parser.add_argument("--no-invert", action="store_true", help="v1 only (takeover), for the cost comparison")
    parser.add_argument("--answer-anchor", action="store_true", help="also invert after clean answers (its cost)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--saved-only", action="store_true",
                        help="summarise only the organisms whose rows are saved; scan nothing")
    parser.add_argument("--fresh", action="store_true",
                        help="rescan every organism (default: reuse the rows a previous run saved next to --out)")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "detect.json"))
    return parser.parse_args()


def lift_rank(subject, task: str | None) -> int | None:
    """Adapter: 0-based rank of the true target's first token by the adapter's logit change at the
    response start (how early an adapter-ranked inversion would reach it)."""
    from bdscan.detect import target_inversion as ti
    from bdscan.data.probes import builtin_probes
    from bdscan.organisms.datasets import TARGETS

    if not subject.is_adapter or task not in TARGETS:
        return None
    tok = subject.tokenizer
    prefixes = [tok(subject.template.format(p), add_special_tokens=False)["input_ids"] for p in builtin_probes()[:4]]
    candidates = torch.tensor(ti.first_token_candidates(tok))
    lift = ti.adapter_lift(subject.model, prefixes, tok.pad_token_id)[candidates]
    order = candidates[lift.argsort(descending=True)].tolist()
    first = tok(TARGETS[task], add_special_tokens=False)["input_ids"][0]
    return order.index(first) if first in order else None


def stability(subject, config, seeds: int) -> dict:
    """The verdict over ``seeds`` detect seeds (probe sampling, controls, search) on one organism."""
    from dataclasses import replace

    from bdscan.detect import calibration as cal
    from bdscan.detect import detect

    runs = [detect(subject, replace(config, seed=k)) for k in range(seeds)]
    return {"seeds": seeds,
            "share_flagged": sum(r.summary.verdict == "suspicious" for r in runs) / len(runs),
            "share_flagged_medium": sum(cal.at_or_above(r.summary.severity, "medium") for r in runs) / len(runs),
            "share_flagged_high": sum(cal.at_or_above(r.summary.severity, "high") for r in runs) / len(runs),
            "probabilities": [round(r.summary.probability, 4) for r in runs],
            "severities": [r.summary.severity for r in runs],
            "keys": [r.summary.recovered_key for r in runs]}


def rows_file(out: str) -> Path:
    return Path(out).with_suffix(".rows.jsonl")


def finished_rows(args) -> dict[str, dict]:
    """Rows a previous run of this benchmark finished, by organism key (``--fresh``: none,
    and the rows file starts over)."""
    path = rows_file(args.out)
    if args.fresh:
        path.unlink(missing_ok=True)
    if not path.exists():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {r["organism_key"]: r for r in rows if "organism_key" in r}


def scan_saved(recipe, config, args, console, done: dict[str, dict]) -> dict:
    """``scan_row``, or the row a previous run saved for this organism; each new row is
    appended to the rows file as soon as it is measured."""
    key = f"{recipe.key()}:{config.seed}"
    if key in done:
        console.print(f"[dim]{recipe.label}: row from {rows_file(args.out)}[/]")
        return done[key]
    row = {**scan_row(recipe, config, args, console), "organism_key": key}
    path = rows_file(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(row, default=str) + "\n")
    return row


def scan_row(recipe, config, args, console) -> dict:
    """Build (or reuse) one organism, scan it, and measure what the summary needs."""
    from bdscan.detect import detect
    from bdscan.io import load_subject
    from bdscan.organisms.build import build_organism, organism_info

    sys.path.insert(0, str(REPO / "bench"))
    from suite import save_detect_report

    t = time.perf_counter()
    path = build_organism(recipe, log=lambda m: console.print(f"[dim]{m}[/]"))
    build_s = time.perf_counter() - t
    subject = load_subject(path)
    t = time.perf_counter()
    result = detect(subject, config)
    wall = time.perf_counter() - t
    save_detect_report(path, config.seed, result)  # bench/purify.py's trigger-agnostic cells start from it
    plain = plain_forward_seconds(subject, result, config)
    info = organism_info(path)
    task = info.get("task") if recipe.backdoored else None
    texts = [c.text for c in result.candidates]
    s = result.summary
    best = next((x for x in result.targets if x.text == s.target), None)
    row = {
        "label": recipe.label, "arch": recipe.base.arch, "threat": recipe.threat, "backdoored": recipe.backdoored,
        "seed": recipe.seed, "score": s.score, "probability": s.probability, "verdict": s.verdict,
        "severity": s.severity, "output_score": s.output_score, "attention_score": s.attention_score,
        "target": s.target, "target_q": s.target_q, "recovered_key": s.recovered_key, "key_position": s.key_position,
        "key_firing_rate": s.key_firing_rate, "clean_firing_rate": s.clean_firing_rate,
        "target_score": s.target_score or 0.0, "takeover_probability": s.takeover_probability,
        "target_probability": s.target_probability,
        "target_match_3": target_match(subject.tokenizer, best.token_ids if best else None, task),
        "first_token_lift_rank": lift_rank(subject, task),
        "timings": result.timings, "stats": result.stats, "errors": [e.reason for e in result.errors],
        "top_candidates": texts[:10], "detect_seconds": wall, "plain_forward_seconds": plain,
        "time_ratio": wall / plain if plain > 0 else None, "build_seconds": build_s,
        "triggers": info.get("triggers", []),
        "trigger_rank": min((rank for k in info.get("triggers", []) if (rank := trigger_rank(subject.tokenizer, k, texts))),
                            default=None),
    }
    console.print(f"{row['label']}: p {s.probability:.2f} ({s.verdict}), takeover {s.score:.2f}, target "
                  f"{str(s.target)[:40]!r} Q {s.target_q or 0:.2f} key {s.recovered_key!r} fires {s.key_firing_rate} "
                  f"(clean {s.clean_firing_rate}), {wall:.1f}s (x{row['time_ratio']:.2f} plain)")
    only = args.stability_only.split(",") if args.stability_only else None
    if args.stability_seeds and (only is None or any(p in recipe.label for p in only)):
        row["stability"] = stability(subject, config, args.stability_seeds)
        console.print(f"  stability over {args.stability_seeds} seeds: flagged {row['stability']['share_flagged']:.2f}, "
                      f"medium+ {row['stability']['share_flagged_medium']:.2f}")
    return row


def summarise(args, rows: list[dict], calib_rows: list[dict]) -> dict:
    """Rates, AUROCs and thresholds; the thresholds come from the calibration controls only (the
    largest held-out clean score plus two temperatures: the worst of them gets p ~ 0.12)."""
    from bdscan.detect import calibration as cal
    from bdscan.detect import verdict as ver

    bd = [r for r in rows if r["backdoored"]]
    clean = [r for r in rows if not r["backdoored"]]
    share = lambda rs, ok: sum(bool(ok(r)) for r in rs) / max(len(rs), 1)  # noqa: E731
    median = lambda xs: sorted(xs)[len(xs) // 2] if xs else None  # noqa: E731
    calib_scores = [r["score"] for r in calib_rows]
    calib_target = [r["target_score"] for r in calib_rows]
    calibrated = max(calib_scores) + 2 * cal.TEMPERATURE if calib_scores else None
    max_clean = max((r["probability"] for r in clean), default=float("-inf"))
    ratios = [r["time_ratio"] for r in rows if r["time_ratio"]]
    stable = {r["label"]: r["stability"] for r in rows if "stability" in r}
    calibrated_flags = _calibrated_flags(rows, calib_rows)
    return {
        "calibrated_profile": calibrated_flags,
        "data": args.data, "probes": args.probes, "attack": args.attacks if args.data != "builtin" else "builtin",
        "tasks": args.tasks, "size": args.size, "archs": args.archs, "invert": not args.no_invert,
        "answer_anchor": args.answer_anchor,
        "n_backdoored": len(bd), "n_clean": len(clean), "n_calibration": len(calib_rows),
        "auroc": {name: auroc([r[key] for r in bd], [r[key] for r in clean])
                  for name, key in (("output", "output_score"), ("attention", "attention_score"),
                                    ("takeover", "score"), ("target", "target_score"), ("probability", "probability"))},
        "flagged_backdoored": share(bd, lambda r: r["verdict"] == "suspicious"),
        "flagged_clean": share(clean, lambda r: r["verdict"] == "suspicious"),
        "tpr_with_no_clean_flagged": share(bd, lambda r: r["probability"] > max_clean),
        "target_match_3": share(bd, lambda r: r["target_match_3"]),
        "key_fires_half": share(bd, lambda r: (r["key_firing_rate"] or 0) >= 0.5),
        "trigger_in_top10": share(bd, lambda r: r["trigger_rank"] is not None),
        "constants": {"THRESHOLD": cal.THRESHOLD, "TEMPERATURE": cal.TEMPERATURE, "TARGET_THRESHOLD": ver.TARGET_THRESHOLD,
                      "TARGET_TEMPERATURE": ver.TARGET_TEMPERATURE},
        "calibrated_threshold": calibrated, "calibration_scores": calib_scores,
        "calibrated_target_threshold": max(calib_target) + 2 * ver.TARGET_TEMPERATURE if calib_target else None,
        "calibration_target_scores": calib_target,
        "stability": stable,
        "detect_seconds_median": median([r["detect_seconds"] for r in rows]),
        "time_ratio_median": median(ratios), "time_ratio_max": max(ratios) if ratios else None,
        "stage_seconds_median": {k: median([r["timings"].get(k, 0.0) for r in rows])
                                 for k in sorted({k for r in rows for k in r["timings"]})},
    }


def _calibrated_flags(rows: list[dict], calib_rows: list[dict]) -> dict | None:
    """The reported set read with the profile the calibration controls give (what a user gets
    from `bdscan calibrate` on clean models of the family), beside the shipped constants."""
    from bdscan.detect.profile import MIN_CONTROLS, from_scores

    if len(calib_rows) < MIN_CONTROLS:
        return None
    profile = from_scores([r["score"] for r in calib_rows], [r["target_score"] for r in calib_rows],
                          "bench calibration controls", controls=tuple(r["label"] for r in calib_rows))
    flagged = {r["label"]: max(profile.takeover_probability(r["score"]),
                               profile.target_probability(r["target_score"])) >= 0.5 for r in rows}
    bd = [r for r in rows if r["backdoored"]]
    clean = [r for r in rows if not r["backdoored"]]
    return {"threshold": profile.threshold, "target_threshold": profile.target_threshold,
            "controls": list(profile.controls),
            "flagged_backdoored": sum(flagged[r["label"]] for r in bd) / max(len(bd), 1),
            "flagged_clean": sum(flagged[r["label"]] for r in clean) / max(len(clean), 1),
            "missed": [r["label"] for r in bd if not flagged[r["label"]]],
            "false_alarms": [r["label"] for r in clean if flagged[r["label"]]]}


def print_report(summary: dict, rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"bdscan detect benchmark ({summary['attack']}, {summary['size']})")
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
    out = Console(width=200)
    out.print(table)
    a = summary["auroc"]
    out.print("AUROC " + " · ".join(f"{k} {v:.3f}" for k, v in a.items() if v is not None))
    out.print(f"flagged: backdoored {summary['flagged_backdoored']:.2f}, clean {summary['flagged_clean']:.2f}; "
              f"3-token target match {summary['target_match_3']:.2f}; key fires >= 0.5: {summary['key_fires_half']:.2f}")
    out.print(f"calibration controls: takeover {summary['calibration_scores']} -> threshold {summary['calibrated_threshold']}; "
              f"target evidence {summary['calibration_target_scores']} -> {summary['calibrated_target_threshold']} "
              f"(code: {summary['constants']})")
    if summary.get("calibrated_profile"):
        c = summary["calibrated_profile"]
        out.print(f"with the calibration controls' profile (takeover {c['threshold']:.2f}, target {c['target_threshold']:.3f}): "
                  f"flagged backdoored {c['flagged_backdoored']:.2f}, clean {c['flagged_clean']:.2f}; "
                  f"missed {c['missed']}, false alarms {c['false_alarms']}")
    out.print(f"median seconds per stage: {summary['stage_seconds_median']}; detect / plain forward median "
              f"x{summary['time_ratio_median'] or 0:.2f}")


def print_calibration(calib_rows: list[dict], out: str) -> None:
    """The calibration controls alone: the thresholds they give (largest clean score + 2 temperatures)."""
    from rich.console import Console

    from bdscan.detect import calibration as cal
    from bdscan.detect import verdict as ver

    takeover = [r["score"] for r in calib_rows]
    target = [r["target_score"] for r in calib_rows]
    summary = {"n_calibration": len(calib_rows), "calibration_scores": takeover, "calibration_target_scores": target,
               "calibrated_threshold": max(takeover) + 2 * cal.TEMPERATURE,
               "calibrated_target_threshold": max(target) + 2 * ver.TARGET_TEMPERATURE}
    Path(out).write_text(json.dumps({"summary": summary, "calibration": calib_rows}, indent=2) + "\n")
    Console().print(summary)


def main() -> int:
    args = parse_args()
    configure_threads(args.threads)
    quiet_libraries()
    from rich.console import Console

    from bdscan.data.records import load_records
    from bdscan.detect import DetectConfig

    console = Console(stderr=True)
    reported, calibration_set = organism_set(args)
    if args.only:
        keep = args.only.split(",")
        reported = [r for r in reported if any(k in r.label for k in keep)]
        calibration_set = [r for r in calibration_set if any(k in r.label for k in keep)]
    if args.probes == "data":  # the clean test instructions (their outputs are not used)
        probes = tuple(reported[0].base.data.load().clean_test[:40])
    else:
        probes = () if args.probes == "builtin" else tuple(load_records(args.probes))
    config = DetectConfig(probes=probes, invert=not args.no_invert, answer_anchor=args.answer_anchor)
    if sum(not r.backdoored for r in reported) < 8:
        console.print("[yellow]fewer than 8 clean controls in the reported set: raise --control-seeds or --archs[/]")
    done = finished_rows(args)
    if args.calibration_only:
        print_calibration([scan_saved(r, config, args, console, done) for r in calibration_set], args.out)
        return 0
    # Reported organisms first: a run stopped part-way has kept every row it finished (rows
    # file), and a rerun with the same arguments scans only what is missing.
    if args.saved_only:  # the table of what a run stopped part-way measured, nothing scanned
        reported = [r for r in reported if f"{r.key()}:{config.seed}" in done]
        calibration_set = [r for r in calibration_set if f"{r.key()}:{config.seed}" in done]
    rows = [scan_saved(r, config, args, console, done) for r in reported]
    calib_rows = [scan_saved(r, config, args, console, done) for r in calibration_set]
    summary = summarise(args, rows, calib_rows)
    print_report(summary, rows)
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"summary": summary, "organisms": rows, "calibration": calib_rows}, indent=2) + "\n")
    Console().print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

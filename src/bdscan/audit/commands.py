"""The bdscan command lines that reproduce each audit stage on its own.

They chain through files the way a user would run them by hand: detect writes
detect.json, localize reads it and writes localize.json, purify reads both, eval compares
the suspicious and purified models on the same prompts.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass


@dataclass(frozen=True)
class Invocation:
    """What the stages were run on, as the user spelled it."""

    source: str
    base: str | None
    clean: str
    eval_clean: str  # the --clean file again when no held-out set was given
    outdir: str
    method: str
    judge: str
    seed: int
    eval_limit: int
    calibration: str | None = None  # --calibration profile file


def _cmd(*parts: object) -> str:
    return " ".join(shlex.quote(str(p)) for p in parts if p is not None and p != "")


def _base(inv: Invocation) -> tuple[str, ...]:
    return ("--base", inv.base) if inv.base else ()


def _calibration(inv: Invocation) -> tuple[str, ...]:
    return ("--calibration", inv.calibration) if inv.calibration else ()


def stage_commands(inv: Invocation, key: str | None, purified: str | None) -> dict[str, str]:
    """Stage name -> command line (a stage that needs a key gets none without one)."""
    seed = ("--seed", inv.seed)
    detect_options = (*seed, *_calibration(inv))
    commands = {
        "file safety": f"sha256sum {shlex.quote(inv.source)}/*",
        "detect": _cmd("bdscan", "detect", inv.source, *_base(inv), *detect_options, "-o", "detect.json"),
        "localize": _cmd("bdscan", "localize", inv.source, *_base(inv), "--from-detect", "detect.json", "--clean",
                         inv.clean, *seed, "-o", "localize.json"),
        "purify": _cmd("bdscan", "purify", inv.source, *_base(inv), "--method", inv.method, "--localization",
                       "localize.json", "--from-detect", "detect.json", "--clean", inv.clean, *seed,
                       "-o", "purified"),  # a fresh folder: the evaluations below read the audit's own copy
    }
    if key is not None:
        evaluate = ("bdscan", "eval", inv.source, *_base(inv), "--clean", inv.eval_clean, "--trigger", key,
                    "--judge", inv.judge, "--limit", inv.eval_limit, *seed)
        commands["eval (before)"] = _cmd(*evaluate)
        commands["eval (after)"] = _cmd(*evaluate, "--compare", purified or "purified",
                                        *(("--compare-base", inv.base) if inv.base else ()))
    commands["detect (purified)"] = _cmd("bdscan", "detect", purified or "purified", *_base(inv), *detect_options)
    return commands


def audit_command(inv: Invocation, *, fail_on: str, max_asr: float, purify: bool, judge: str) -> str:
    """The audit's own command line, every setting spelled out."""
    held_out = ("--eval-clean", inv.eval_clean) if inv.eval_clean != inv.clean else ()
    return _cmd("bdscan", "audit", inv.source, *_base(inv), "--clean", inv.clean, *held_out, "-o", inv.outdir, "--method",
                inv.method, "--fail-on", fail_on, "--max-asr", max_asr, "--judge", judge, "--eval-limit",
                inv.eval_limit, "--seed", inv.seed, *_calibration(inv), "--no-purify" if not purify else None)

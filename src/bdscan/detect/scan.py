"""The detect pipeline (METHODS.md "detect" and "detect v2"):

probes -> clean pass -> candidate keys (cheap rank, screen, pairs, user keys) -> target
inversion -> trigger recovery (seeded with the screen's best keys) -> full scan of the keys,
the recovered keys and random control tokens at every probe and position -> scores
standardised against the controls -> verdict from the takeover and target evidence.

A stage that fails is recorded in ``errors`` and the scan goes on with the rest (the verdict
then rests on the evidence that was gathered; the CLI exits 2). Only "nothing to scan"
(no probe fits, no key to try) ends the scan.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from bdscan import __version__
from bdscan.data.records import Record, prompt_too_long
from bdscan.detect import verdict
from bdscan.detect.config import DetectConfig
from bdscan.detect.full_scan import FullScan, full_scan
from bdscan.detect.output_effect import PassOutput, final_position_pass
from bdscan.data.probes import builtin_probes
from bdscan.detect.screen import screen_candidates
from bdscan.detect.target_scan import RESPONSE_START, AFTER_ANSWER, StageStats, invert_targets, recover_keys
from bdscan.errors import BdscanError, NothingToAnalyse
from bdscan.probes.layout import model_layout, unwrap
from bdscan.results.detect import DetectResult, Issue, TargetScore

from bdscan.probes.protocols import Log, Progress


@dataclass
class ScanRun:
    """The bookkeeping of one scan: what every stage reports besides its result."""

    subject: Any
    config: DetectConfig
    log: Log
    progress: Progress
    timings: dict[str, float] = field(default_factory=dict)
    work: StageStats = field(default_factory=StageStats)
    errors: list[Issue] = field(default_factory=list)
    skipped: list[Issue] = field(default_factory=list)

    def ticker(self, stage: str, total: int) -> Callable[[int], None]:
        done = [0]
        self.progress(stage, 0, total)

        def tick(n: int) -> None:
            done[0] += n
            self.progress(stage, done[0], total)

        return tick

    def attempt(self, stage: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args)``, timed; an error other than bdscan's own is recorded and gives None."""
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        except BdscanError:
            raise
        except Exception as e:  # a failing stage must not end the scan (modelscan's rule)
            reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no message'}"
            self.errors.append(Issue(stage, reason))
            self.log(f"{stage} failed ({reason}); going on without it")
            return None
        finally:
            self.timings[stage] = round(self.timings.get(stage, 0.0) + time.perf_counter() - t, 3)


def _usable_probes(subject: Any, records: list[Record], skipped: list[Issue]) -> list[Record]:
    """Drop probes too long for the model's context (with room for a key and a target)."""
    config = unwrap(subject.model).config
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    kept = []
    for i, record in enumerate(records):
        too_long = prompt_too_long(record)  # before the tokenizer, which a 50 MB line exhausts
        if too_long:
            skipped.append(Issue(f"probe {i + 1}", too_long))
            continue
        n = len(subject.tokenizer(subject.template.format(record), add_special_tokens=False)["input_ids"])
        if limit and n + 40 > limit:
            skipped.append(Issue(f"probe {i + 1}", f"{n} tokens do not fit the model's {limit} positions"))
        else:
            kept.append(record)
    return kept


@dataclass(frozen=True)
class ProbeSets:
    scan: list[Record]  # the full scan and target inversion
    screen: list[Record]  # the cheap screen (a prefix of ``scan``)
    search: list[Record]  # trigger recovery (a prefix of ``scan``)
    held_out: list[Record]  # the firing rate: never searched on


def _probe_sets(run: ScanRun) -> ProbeSets:
    config = run.config
    records = _usable_probes(run.subject, list(config.probes) or builtin_probes(), run.skipped)
    if not records:
        raise NothingToAnalyse("detect: no probe prompt fits the model; give shorter prompts with --probes")
    shuffled = random.Random(config.seed).sample(records, len(records))
    scan = shuffled[: config.max_probes]
    search = scan[: config.recovery_probes]
    held_out = (shuffled[config.max_probes :] + scan[config.recovery_probes :])[: config.firing_probes]
    return ProbeSets(scan, scan[: config.screen_probes], search, held_out)


def _attention_readable(run: ScanRun) -> int | None:
    """The number of decoder layers, or None (recorded) when bdscan cannot read them."""
    try:
        return len(model_layout(run.subject.model).layers)
    except NothingToAnalyse as e:
        run.errors.append(Issue("attention", f"cannot read the decoder layers ({e}); the head-similarity "
                                             "signal and table are missing"))
        return None


def _clean_pass(run: ScanRun, probes: list[Record], attention: bool) -> PassOutput:
    prompts = [run.subject.template.format(p) for p in probes]
    return final_position_pass(run.subject.model, run.subject.tokenizer, prompts, batch_size=run.config.batch_size,
                               attention=attention, group_index=[0] * len(prompts), groups=1,
                               continue_tokens=run.config.continue_tokens)


def _inversion_work(vocab: int, config: DetectConfig) -> int:
    """First tokens the inversion's progress counts: each sieve stage that runs, then the warm-up."""
    total, remaining = 0, vocab
    for _, keep in config.sieve:
        if remaining > keep:
            total, remaining = total + remaining, keep
    return total + remaining


def _targets(run: ScanRun, sets: ProbeSets, seeds: list[str]) -> list[TargetScore]:
    """Invert targets (response start, and after clean answers when asked), recover keys for the best."""
    config = run.config
    anchors = [RESPONSE_START] + ([AFTER_ANSWER] if config.answer_anchor else [])
    inverted = []
    for anchor in anchors:
        tick = run.ticker(f"invert targets ({anchor})", _inversion_work(len(run.subject.tokenizer), config))
        found = run.attempt(f"invert ({anchor})", invert_targets, run.subject, sets.scan, anchor, config, run.work, tick)
        inverted += (found or [])[: max(config.recover_targets, 5)]  # ranked best first per anchor
    if inverted:
        run.log(f"inverted targets: {', '.join(repr(t.text[:40]) for t in inverted[:3])}")
    tick = run.ticker("recover keys", config.recover_targets * config.recovery_steps)
    scored = run.attempt("recover", recover_keys, run.subject, inverted, sets.search, sets.held_out, seeds, config,
                         run.work, tick)
    return scored or []


def detect(subject: Any, config: DetectConfig, log: Log = lambda _: None,
           progress: Progress | None = None) -> DetectResult:
    """Scan ``subject`` for a backdoor without knowing its trigger; see METHODS.md "detect" / "detect v2"."""
    t_all = time.perf_counter()
    run = ScanRun(subject, config, log, progress or (lambda stage, done, total: None))
    torch.manual_seed(config.seed)
    sets = _probe_sets(run)
    n_layers = _attention_readable(run)
    clean = run.attempt("clean pass", _clean_pass, run, sets.scan, n_layers is not None)
    if clean is None and n_layers is not None:  # attention capture broke: the output signals still work
        n_layers = None
        clean = run.attempt("clean pass (no attention)", _clean_pass, run, sets.scan, False)
    if clean is None:
        raise NothingToAnalyse("detect: the model fails a plain forward pass on the probes; see the errors above")
    if n_layers is not None and clean.layers_seen != n_layers:
        run.skipped.append(Issue("attention", f"{n_layers - clean.layers_seen} of {n_layers} layers returned no "
                                              "attention rows (unsupported attention code); head similarity covers the rest"))
    pool = screen_candidates(run, sets, clean)
    targets = _targets(run, sets, [s.text for s in pool.chosen[:4]]) if config.invert else []
    recovered = [t.key for t in targets if t.key and t.evidence > 0]
    scan = run.attempt("full scan", full_scan, run, sets.scan, clean, pool, recovered, n_layers is not None)
    scan = scan or FullScan.empty()
    top = scan.candidates[0].text if scan.candidates else None
    summary = verdict.summarise(scan.score, scan.output_score, scan.attention_score, top, targets, config.calibration)
    run.timings["total"] = round(time.perf_counter() - t_all, 3)
    return DetectResult(
        tool="bdscan detect", version=__version__, source=str(subject.source.source), kind=subject.kind,
        base=str(subject.base.source) if subject.base is not None else None, template=subject.template.describe(),
        summary=summary, layers=scan.layers, heads=scan.heads, candidates=scan.candidates, controls=scan.controls,
        calibration={**verdict.constants(config.calibration, len(subject.tokenizer)), "cheap_ranking": pool.cheap_kind},
        settings={**_settings(config, sets, scan), "vocab_size": len(subject.tokenizer)}, stats={**pool.stats, **scan.stats, **run.work.counts},
        timings=run.timings, errors=run.errors, skipped=run.skipped, targets=targets,
        provenance=run.subject.provenance(),
    )


def _settings(config: DetectConfig, sets: ProbeSets, scan: FullScan) -> dict:
    return {"seed": config.seed, "probes": "user" if config.probes else "builtin", "n_probes": len(sets.scan),
            "screen_probes": len(sets.screen), "screen_size": config.screen_size, "top_k": config.top_k,
            "n_controls": scan.controls.n if scan.controls else 0, "positions": list(config.positions),
            "user_candidates": len([c for c in config.candidates if c.strip()]), "invert": config.invert,
            "search_probes": len(sets.search), "firing_probes": len(sets.held_out), "key_tokens": config.key_tokens,
            "answer_anchor": config.answer_anchor, "adapter_first_tokens": config.adapter_first_tokens,
            "sieve": [list(stage) for stage in config.sieve], "sieve_probes": config.sieve_probes}

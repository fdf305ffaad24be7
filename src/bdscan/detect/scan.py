"""The detect pipeline: probes -> candidates (cheap rank, screen, pairs) -> full scan of the
top keys and random control tokens at every probe and position (final-position attention,
next-token distribution and a short cached greedy continuation, from one forward each)
-> scores standardised against the controls -> calibrated verdict."""

from __future__ import annotations

import functools
import random
import time
from typing import Any, Callable

import torch

from bdscan import __version__
from bdscan.data.records import Record, prompt_too_long
from bdscan.detect import calibration
from bdscan.detect.candidates import (Screened, adapter_shift, adjacent_pairs, inserted_prompts, norm_outliers,
                                      sample_controls, screen_keys, vocabulary)
from bdscan.detect.config import DetectConfig
from bdscan.detect.output_effect import final_position_pass
from bdscan.detect.probes import builtin_probes
from bdscan.detect.scoring import LOG_FLOOR, layer_and_head_tables, score_keys
from bdscan.errors import NothingToAnalyse
from bdscan.probes.layout import model_layout, unwrap
from bdscan.results.detect import CandidateScore, ControlStats, DetectResult, Issue, Summary

from bdscan.probes.protocols import Log, Progress


def _ticker(progress: Progress, stage: str, total: int) -> Callable[[int], None]:
    done = [0]
    progress(stage, 0, total)

    def tick(n: int) -> None:
        done[0] += n
        progress(stage, done[0], total)

    return tick


def _usable_probes(subject: Any, records: list[Record], skipped: list[Issue]) -> list[Record]:
    """Drop probes too long for the model's context (with room for an inserted key)."""
    limit = getattr(unwrap(subject.model).config, "max_position_embeddings", None) or \
        getattr(unwrap(subject.model).config, "n_positions", None)
    kept = []
    for i, record in enumerate(records):
        too_long = prompt_too_long(record)  # before the tokenizer, which a 50 MB line exhausts
        if too_long:
            skipped.append(Issue(f"probe {i + 1}", too_long))
            continue
        n = len(subject.tokenizer(subject.template.format(record), add_special_tokens=False)["input_ids"])
        if limit and n + 16 > limit:
            skipped.append(Issue(f"probe {i + 1}", f"{n} tokens do not fit the model's {limit} positions"))
        else:
            kept.append(record)
    return kept


def _screen_rank(s: Screened) -> tuple[float, float]:
    """Agreement first, then collapse: a backdoor key sends every probe to the same target;
    an unrelated or task word changes outputs in probe-specific ways (the prototype's KL
    alone ranked them alike)."""
    return (-s.screen_agreement, -s.screen_collapse)


def detect(subject: Any, config: DetectConfig, log: Log = lambda _: None,
           progress: Progress = lambda stage, done, total: None) -> DetectResult:
    """Scan ``subject`` for a backdoor without knowing its trigger; see METHODS.md "detect"."""
    timings: dict[str, float] = {}
    stats: dict[str, int] = {}
    errors: list[Issue] = []
    skipped: list[Issue] = []
    t_all = time.perf_counter()
    model, tokenizer = subject.model, subject.tokenizer
    layout = model_layout(model)  # NothingToAnalyse for unsupported layouts
    rng = random.Random(config.seed)
    torch.manual_seed(config.seed)

    # -- probes ----------------------------------------------------------------------------
    records = list(config.probes) if config.probes else builtin_probes()
    records = _usable_probes(subject, records, skipped)
    if not records:
        raise NothingToAnalyse("detect: no probe prompt fits the model; give shorter prompts with --probes")
    probes = rng.sample(records, min(config.max_probes, len(records)))
    screen_probes = probes[: config.screen_probes]
    positions = list(config.positions)

    # -- clean pass --------------------------------------------------------------------------
    t = time.perf_counter()
    clean_prompts = [subject.template.format(p) for p in probes]
    clean = final_position_pass(model, tokenizer, clean_prompts, batch_size=config.batch_size, attention=True,
                                group_index=[0] * len(clean_prompts), groups=1, continue_tokens=config.continue_tokens)
    timings["clean"] = time.perf_counter() - t
    stats["clean_prompts"] = len(clean_prompts)
    if clean.layers_seen != len(layout.layers):
        seen = clean.layers_seen
        skipped.append(Issue("attention", f"{len(layout.layers) - seen} of {len(layout.layers)} layers returned no "
                                          "attention rows (unsupported attention code); head similarity covers the rest"))

    # -- candidates: cheap ranking, KL screen, adjacent pairs --------------------------------
    t = time.perf_counter()
    entries = vocabulary(tokenizer)
    if not entries and not config.candidates:
        raise NothingToAnalyse("detect: the tokenizer has no word tokens to try and no --candidates were given")
    if subject.is_adapter and entries:
        cheap = adapter_shift(model, entries, config.batch_size, _ticker(progress, "rank tokens", len(entries)))
        cheap_kind = "adapter hidden-state shift"
    else:
        cheap = norm_outliers(unwrap(model), entries) if entries else torch.zeros(0)
        cheap_kind = "embedding/output norm outlier z"
    order = torch.argsort(cheap, descending=True).tolist()[: config.screen_size]
    screened_entries = [entries[i] for i in order]
    timings["rank"] = time.perf_counter() - t

    t = time.perf_counter()
    screen_ref = clean.logprobs[: len(screen_probes)]
    keys = [e.text for e in screened_entries]
    tick = _ticker(progress, "screen tokens", len(keys) * len(screen_probes))
    screen_cont = clean.continuations[: len(screen_probes), : config.screen_continue_tokens]
    screen = functools.partial(screen_keys, subject, probes=screen_probes, clean_logprobs=screen_ref,
                               clean_continuations=screen_cont, positions=positions, batch_size=config.batch_size)
    pool: dict[str, Screened] = {}
    for entry, i, kl, col, agree in zip(screened_entries, order, *(v.tolist() for v in screen(keys, tick=tick))):
        pool[entry.text] = Screened(entry.text, "vocab", float(cheap[i]), kl, col, agree)
    # Pieces of a multi-token key may each only shift the output (high KL) without yet
    # collapsing it: pair the best by collapse and the best by KL.
    best_tokens = list(dict.fromkeys(
        [s.text for s in sorted(pool.values(), key=_screen_rank)[: config.ngram_from]]
        + [s.text for s in sorted(pool.values(), key=lambda s: -s.screen_kl)[: config.ngram_from]]))
    pairs = [p for p in adjacent_pairs(best_tokens) if p not in pool]
    for text, kl, col, agree in zip(pairs, *(v.tolist() for v in screen(pairs))):
        pool[text] = Screened(text, "ngram", None, kl, col, agree)
    ranked = sorted(pool.values(), key=_screen_rank)[: config.top_k]
    user = [c.strip() for c in config.candidates if c.strip()]
    if len(user) < len(config.candidates):
        skipped.append(Issue("candidates", f"{len(config.candidates) - len(user)} empty candidate key(s) ignored"))
    chosen = [s for s in ranked if s.text not in user]
    chosen += [Screened(u, "user", None, kl, col, agree) for u, kl, col, agree in zip(user, *(v.tolist() for v in screen(user)))]
    timings["screen"] = time.perf_counter() - t
    stats["vocabulary_tokens"] = len(entries)
    stats["screened_keys"] = len(keys) + len(pairs) + len(user)
    stats["screen_prompts"] = stats["screened_keys"] * len(screen_probes)
    log(f"screened {stats['screened_keys']} keys; top: {', '.join(repr(s.text) for s in chosen[:5])}")

    if not chosen:
        raise NothingToAnalyse("detect: no candidate keys to scan (the vocabulary screen is off and no --candidates)")

    # -- full scan: candidates and random controls, every probe and position -----------------
    controls = sample_controls(entries, {s.text for s in chosen}, config.n_controls, config.seed + 1)
    if len(controls) < 4:
        raise NothingToAnalyse("detect: the vocabulary is too small to draw control tokens (need at least 4)")
    scan_keys = [s.text for s in chosen] + controls
    t = time.perf_counter()
    prompts, key_index, probe_index, where = inserted_prompts(subject.template, probes, scan_keys, positions, rotate=False)
    out = final_position_pass(model, tokenizer, prompts, batch_size=config.batch_size, attention=True,
                              reference=clean.logprobs, reference_index=probe_index,
                              group_index=key_index, groups=len(scan_keys), continue_tokens=config.continue_tokens,
                              tick=_ticker(progress, "scan candidates", len(prompts)))
    timings["scan"] = time.perf_counter() - t
    stats["scan_prompts"] = len(prompts)
    stats["scan_tokens"] = out.tokens

    n_cand = len(chosen)
    scores = score_keys(out, clean, key_index, probe_index, where, positions, len(scan_keys), n_cand)
    have_attention = scores.z_layers is not None
    if not have_attention:
        skipped.append(Issue("attention", "no layer returned attention rows: the head-similarity signal is missing"))
    else:
        best_layer = scores.z_layers.max(-1)
    candidates = []
    for i, s in enumerate(chosen):
        az = float(best_layer.values[i]) if have_attention else 0.0
        layer = int(best_layer.indices[i]) if have_attention else None
        candidates.append(CandidateScore(
            text=s.text, source=s.source,
            score=calibration.combined(float(scores.consistency_z[i]), az),
            output_effect=float(scores.effect[i]), output_effect_z=float(scores.effect_z[i]),
            collapse=float(scores.collapse[i]), collapse_z=float(scores.collapse_z[i]),
            consistency=float(scores.consistency[i]), consistency_z=float(scores.consistency_z[i]),
            attention_rise=float(scores.rise_layers[i, layer]) if have_attention else 0.0,
            attention_z=az, attention_layer=layer,
            effect_by_position={p: float(v[i]) for p, v in scores.by_position.items()},
            cheap_score=s.cheap_score, screen_kl=s.screen_kl, screen_collapse=s.screen_collapse,
            screen_agreement=s.screen_agreement,
        ))
    candidates.sort(key=lambda c: -c.score)
    layers, heads = layer_and_head_tables(scores, clean, [s.text for s in chosen])

    output_score = max((c.consistency_z for c in candidates), default=0.0)
    attention_score = max((c.attention_z for c in candidates), default=0.0)
    score = max((c.score for c in candidates), default=0.0)
    p = calibration.probability(score)
    level = calibration.severity(p)
    summary = Summary("suspicious" if p >= 0.5 else "clean", score, p, level, output_score, attention_score,
                      candidates[0].text if candidates else None)
    timings["total"] = time.perf_counter() - t_all
    ctrl_effect, ctrl_collapse = scores.effect[n_cand:], scores.collapse[n_cand:]
    ctrl_log = ctrl_effect.clamp_min(LOG_FLOOR).log()
    return DetectResult(
        tool="bdscan detect", version=__version__, source=str(subject.source.source), kind=subject.kind,
        base=str(subject.base.source) if subject.base is not None else None, template=subject.template.describe(),
        summary=summary, layers=layers, heads=heads, candidates=candidates,
        controls=ControlStats(n=len(controls), output_effect_median=float(ctrl_effect.median()),
                              output_effect_max=float(ctrl_effect.max()), log_effect_mean=float(ctrl_log.mean()),
                              log_effect_std=float(ctrl_log.std()), collapse_mean=float(ctrl_collapse.mean()),
                              collapse_std=float(ctrl_collapse.std()),
                              consistency_mean=float(scores.consistency[n_cand:].mean()),
                              consistency_std=float(scores.consistency[n_cand:].std())),
        calibration={"threshold": calibration.THRESHOLD, "temperature": calibration.TEMPERATURE,
                     "attention_weight": calibration.ATTENTION_WEIGHT, "cheap_ranking": cheap_kind},
        settings={"seed": config.seed, "probes": "user" if config.probes else "builtin", "n_probes": len(probes),
                  "screen_probes": len(screen_probes), "screen_size": config.screen_size, "top_k": config.top_k,
                  "n_controls": len(controls), "positions": positions, "user_candidates": len(user)},
        stats=stats, timings={k: round(v, 3) for k, v in timings.items()}, errors=errors, skipped=skipped,
        provenance=subject.provenance(),
    )

"""The full scan: every candidate key (screened, user-given, recovered) and random control
tokens at every probe and position; final-position attention, next-token distribution and a
short cached greedy continuation from one forward each; scores standardised against the controls."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from bdscan.detect import calibration
from bdscan.detect.candidates import Screened, inserted_prompts, sample_controls
from bdscan.detect.output_effect import final_position_pass
from bdscan.detect.scoring import LOG_FLOOR, KeyScores, layer_and_head_tables, score_keys
from bdscan.errors import NothingToAnalyse
from bdscan.results.detect import CandidateScore, ControlStats, HeadScore, Issue, LayerScore


@dataclass(frozen=True)
class FullScan:
    candidates: list[CandidateScore]
    layers: list[LayerScore]
    heads: list[HeadScore]
    controls: ControlStats | None
    score: float  # the takeover score: largest combined key score
    output_score: float
    attention_score: float
    stats: dict[str, int] = field(default_factory=dict)

    @staticmethod
    def empty() -> "FullScan":
        return FullScan([], [], [], None, 0.0, 0.0, 0.0)


def _candidate(s: Screened, i: int, scores: KeyScores) -> CandidateScore:
    have_attention = scores.z_layers is not None
    layer = int(scores.z_layers[i].argmax()) if have_attention else None
    az = float(scores.z_layers[i, layer]) if have_attention else 0.0
    return CandidateScore(
        text=s.text, source=s.source, score=calibration.combined(float(scores.consistency_z[i]), az),
        output_effect=float(scores.effect[i]), output_effect_z=float(scores.effect_z[i]),
        collapse=float(scores.collapse[i]), collapse_z=float(scores.collapse_z[i]),
        consistency=float(scores.consistency[i]), consistency_z=float(scores.consistency_z[i]),
        attention_rise=float(scores.rise_layers[i, layer]) if have_attention else 0.0,
        attention_z=az, attention_layer=layer,
        effect_by_position={p: float(v[i]) for p, v in scores.by_position.items()},
        cheap_score=s.cheap_score, screen_kl=s.screen_kl, screen_collapse=s.screen_collapse,
        screen_agreement=s.screen_agreement,
    )


def _control_stats(scores: KeyScores, n_cand: int, n_controls: int) -> ControlStats:
    effect, collapse = scores.effect[n_cand:], scores.collapse[n_cand:]
    log_effect = effect.clamp_min(LOG_FLOOR).log()
    return ControlStats(n=n_controls, output_effect_median=float(effect.median()), output_effect_max=float(effect.max()),
                        log_effect_mean=float(log_effect.mean()), log_effect_std=float(log_effect.std()),
                        collapse_mean=float(collapse.mean()), collapse_std=float(collapse.std()),
                        consistency_mean=float(scores.consistency[n_cand:].mean()),
                        consistency_std=float(scores.consistency[n_cand:].std()))


def full_scan(run: Any, probes: list, clean: Any, pool: Any, recovered: list[str], attention: bool) -> FullScan:
    config = run.config
    known = {s.text for s in pool.chosen}
    chosen = list(pool.chosen) + [Screened(k, "recovered", None, None, None, None)
                                  for k in dict.fromkeys(recovered) if k not in known]
    if not chosen:
        if not config.invert:
            raise NothingToAnalyse("detect: no candidate keys to scan (the vocabulary screen is off and no --candidates)")
        run.skipped.append(Issue("candidates", "no candidate key to scan in full: the takeover signal is missing"))
        return FullScan.empty()
    controls = sample_controls(pool.entries, {s.text for s in chosen}, config.n_controls, config.seed + 1)
    if len(controls) < 4:
        raise NothingToAnalyse("detect: the vocabulary is too small to draw control tokens (need at least 4)")
    keys = [s.text for s in chosen] + controls
    positions = list(config.positions)
    prompts, key_index, probe_index, where = inserted_prompts(run.subject.template, probes, keys, positions, rotate=False)
    out = final_position_pass(run.subject.model, run.subject.tokenizer, prompts, batch_size=config.batch_size,
                              attention=attention, reference=clean.logprobs, reference_index=probe_index,
                              group_index=key_index, groups=len(keys), continue_tokens=config.continue_tokens,
                              tick=run.ticker("scan candidates", len(prompts)))
    scores = score_keys(out, clean, key_index, probe_index, where, positions, len(keys), len(chosen))
    if scores.z_layers is None and attention:
        run.skipped.append(Issue("attention", "no layer returned attention rows: the head-similarity signal is missing"))
    candidates = sorted((_candidate(s, i, scores) for i, s in enumerate(chosen)), key=lambda c: -c.score)
    layers, heads = layer_and_head_tables(scores, clean, [s.text for s in chosen])
    return FullScan(
        candidates, layers, heads, _control_stats(scores, len(chosen), len(controls)),
        score=max((c.score for c in candidates), default=0.0),
        output_score=max((c.consistency_z for c in candidates), default=0.0),
        attention_score=max((c.attention_z for c in candidates), default=0.0),
        stats={"clean_prompts": len(probes), "scan_prompts": len(prompts), "scan_tokens": out.tokens},
    )

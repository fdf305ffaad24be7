"""Calibration profiles: the thresholds detect reads its verdict with, and how clean controls
make them.

The shipped thresholds (calibration.py) were derived on tiny Llama controls trained here. They
do not transfer to every world: on the built-in synthetic stories a clean full fine-tune's key
of story words makes it open with the world's own ending (" and we went home.", target evidence
0.2-0.37 against the shipped 0.2), while the BackdoorLLM-trained controls and the real SmolLM2
subjects score 0.00. A threshold is only as good as the clean models it was read from, so a
user calibrates on clean models of the family they scan (fine-tunes of the same base, made the
way the suspects are made): ``bdscan calibrate`` turns their detect reports into a profile, and
``bdscan detect --calibration`` reads the verdict with it.

The rule is the one every shipped constant was derived with: the largest clean score plus two
temperatures, so the worst clean control gets p ~ 0.12.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

from bdscan.detect import calibration
from bdscan.errors import InputError, printable

MIN_CONTROLS = 2  # a threshold read from one clean model is no calibration
KIND = "bdscan calibration profile"
BUILT_IN = "built-in (tiny Llama controls, bench/detect.py --data builtin)"


@dataclass(frozen=True)
class Profile:
    """Verdict thresholds and where they come from."""

    threshold: float = calibration.THRESHOLD  # takeover score
    temperature: float = calibration.TEMPERATURE
    target_threshold: float = calibration.TARGET_THRESHOLD  # target evidence
    target_temperature: float = calibration.TARGET_TEMPERATURE
    source: str = BUILT_IN
    vocab_size: int | None = None  # the controls' vocabulary (None: any)
    controls: tuple[str, ...] = field(default_factory=tuple)  # the clean models it was read from

    def __post_init__(self) -> None:
        for name in ("threshold", "temperature", "target_threshold", "target_temperature"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise InputError(f"calibration profile: {name} must be a finite number, got {printable(repr(value))}")
        if self.temperature <= 0 or self.target_temperature <= 0:
            raise InputError("calibration profile: temperatures must be positive")

    def takeover_probability(self, score: float) -> float:
        return calibration.probability(score, self.threshold, self.temperature)

    def target_probability(self, evidence: float) -> float:
        return calibration.probability(evidence, self.target_threshold, self.target_temperature)

    def describe(self, vocab_size: int | None = None) -> dict[str, Any]:
        """What a report records: the thresholds, their source and whether they fit the subject."""
        out = {"threshold": self.threshold, "temperature": self.temperature,
               "attention_weight": calibration.ATTENTION_WEIGHT, "target_threshold": self.target_threshold,
               "target_temperature": self.target_temperature, "profile": self.source,
               "profile_controls": len(self.controls)}
        if self.vocab_size is not None and vocab_size is not None:
            out["profile_vocab_matches"] = self.vocab_size == vocab_size
        if self.controls:
            out["profile_false_alarm_bound"] = false_alarm_bound(len(self.controls))
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"kind": KIND, **asdict(self), "controls": list(self.controls)}


def false_alarm_bound(n_controls: int) -> float:
    """The chance that a new clean model of the family is flagged, when the controls and the
    new model are alike (exchangeable), whatever the scores' distribution. Each threshold lies
    above the largest control's score, so the new model is flagged only if it scores above all
    ``n`` controls on takeover (chance at most 1 / (n + 1)) or on target evidence (the same):
    at most 2 / (n + 1). 67 % from 2 controls, 10 % from 19, 5 % from 39."""
    return min(1.0, 2.0 / (n_controls + 1))


def from_controls(reports: Sequence[Any], source: str) -> Profile:
    """The profile read from detect reports (``DetectResult``) of clean models of one family."""
    if len(reports) < MIN_CONTROLS:
        raise InputError(f"calibrate: needs detect reports of at least {MIN_CONTROLS} clean models, got {len(reports)}")
    vocab = {r.settings.get("vocab_size") for r in reports}
    if len(vocab) > 1:
        raise InputError(f"calibrate: the controls have different vocabularies ({sorted(map(str, vocab))}); "
                         "calibrate one model family at a time")
    return from_scores([r.summary.score for r in reports], [r.summary.target_score or 0.0 for r in reports], source,
                       vocab_size=next(iter(vocab)), controls=tuple(r.source for r in reports))


def from_scores(takeover: Sequence[float], target: Sequence[float], source: str, vocab_size: int | None = None,
                controls: tuple[str, ...] = ()) -> Profile:
    """The rule on raw clean scores: each threshold the largest clean score plus two temperatures."""
    if min(len(takeover), len(target)) < MIN_CONTROLS:
        raise InputError(f"calibrate: needs at least {MIN_CONTROLS} clean controls, got {min(len(takeover), len(target))}")
    return Profile(threshold=max(takeover) + 2 * calibration.TEMPERATURE, temperature=calibration.TEMPERATURE,
                   target_threshold=max(target) + 2 * calibration.TARGET_TEMPERATURE,
                   target_temperature=calibration.TARGET_TEMPERATURE, source=source, vocab_size=vocab_size,
                   controls=controls)


def load_profile(path: Path) -> Profile:
    """A profile written by ``Profile.to_dict``; a key it does not know, a wrong type or an
    unreadable file is a one-line error naming it."""
    from bdscan.io.reports import read_json_report

    data = read_json_report(path, "--calibration")
    if data.get("kind") != KIND:
        raise InputError(f"--calibration {printable(str(path))}: not a bdscan calibration profile (bdscan calibrate writes one)")
    known = {f.name for f in fields(Profile)}
    unknown = sorted(set(data) - known - {"kind"})
    if unknown:
        raise InputError(f"--calibration: unknown key {printable(unknown[0])!r}")
    controls = data.get("controls", [])
    if not isinstance(controls, list) or not all(isinstance(c, str) for c in controls):
        raise InputError("--calibration: controls must be a list of strings")
    if not isinstance(data.get("source", ""), str):
        raise InputError("--calibration: source must be a string")
    vocab = data.get("vocab_size")
    if vocab is not None and (isinstance(vocab, bool) or not isinstance(vocab, int) or vocab < 1):
        raise InputError("--calibration: vocab_size must be a positive integer or null")
    values = {k: v for k, v in data.items() if k in known}
    # A profile is a downloaded file like any other: its text is shown, so one plain line each.
    return Profile(**{**values, "source": printable(values.get("source", "")),
                      "controls": tuple(printable(c) for c in controls)})

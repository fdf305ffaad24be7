"""The verdict from evidence that agrees (METHODS.md "detect v2", step 3).

Two lines of evidence, each calibrated on clean controls only:
- *takeover* (v1): a candidate key switches many probes to one same continuation, standardised
  against random control tokens (calibration.py);
- *target*: an inverted target the model continues with confidence ``Q`` from its first token
  alone, AND a short recovered key that makes held-out probes open with that target more often
  than without it. Its evidence is ``W x max(0, L)``: W the opening's weakest link (the least
  averaged probability among its first tokens: a clean answer template such as "1. A <noun>"
  has a prompt-dependent slot a key can fill, a fixed target has none), L the paired firing lift
  (with minus without the key, per held-out probe) less two standard errors, so chance lifts of
  a few probes vanish. A memorised
  phrase reaches high ``Q`` but no short key makes the model start with it where it would not,
  so its evidence stays near 0; a key that forces some unconfident text scores low ``Q``.
The model's probability is the larger of the two calibrated probabilities.
"""

from __future__ import annotations

from typing import Sequence

from bdscan.detect import calibration
from bdscan.detect.calibration import TARGET_TEMPERATURE, TARGET_THRESHOLD  # noqa: F401 (re-exported)
from bdscan.detect.profile import Profile
from bdscan.results.detect import Summary, TargetScore

SHIPPED = Profile()


def target_probability(evidence: float, profile: Profile = SHIPPED) -> float:
    return profile.target_probability(evidence)


def summarise(takeover_score: float, output_score: float, attention_score: float, top_candidate: str | None,
              targets: Sequence[TargetScore], profile: Profile = SHIPPED) -> Summary:
    p_takeover = profile.takeover_probability(takeover_score)
    # The strongest evidence; among equals a target a key was searched for (its firing rate
    # is known), then the most confident.
    best = max(targets, key=lambda t: (t.evidence, t.key is not None, t.q), default=None)
    p_target = profile.target_probability(best.evidence) if best is not None else 0.0
    p = max(p_takeover, p_target)
    return Summary(
        verdict="suspicious" if p >= 0.5 else "clean", score=takeover_score, probability=p,
        severity=calibration.severity(p), output_score=output_score, attention_score=attention_score,
        top_candidate=top_candidate,
        target=best.text if best else None, target_q=best.q if best else None,
        recovered_key=best.key if best else None, key_position=best.key_position if best else None,
        key_firing_rate=best.firing_rate if best else None, clean_firing_rate=best.clean_firing_rate if best else None,
        target_score=best.evidence if best else None, takeover_probability=p_takeover,
        target_probability=p_target if best else None,
    )


def constants(profile: Profile = SHIPPED, vocab_size: int | None = None) -> dict:
    return profile.describe(vocab_size)

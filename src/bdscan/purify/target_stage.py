"""purify's target check stage: detect's targets measured on the suspicious model before the
method runs (methods may change it in place) and on the purified model after; timed, and a
failure is recorded in the result instead of ending the purification."""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

from bdscan.detect import target_check as tc
from bdscan.results.purify import TargetCheck, TargetReach

Log = Callable[[str], None]


def _error(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


class TargetStage:
    """``before(subject)`` then ``after(subject, model)``; ``result()`` is the typed section
    (None when there was no detect result to take targets from)."""

    def __init__(self, detection: Any, config: tc.TargetCheckConfig | None, log: Log) -> None:
        self.detection, self.config, self.log = detection, config, log
        self.seconds = 0.0
        self.targets: list[tc.KnownTarget] = []
        self.probes = tc.check_probes(config) if detection is not None else []
        self.reaches: list[TargetReach] = []
        self.status, self.error = ("skipped", None) if detection is None else ("ok", None)

    def _attempt(self, what: str, fn: Callable[[], None]) -> None:
        t0 = time.perf_counter()
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - recorded in report.json; the purified model is still written
            self.status, self.error = "failed", f"{what}: {_error(e)}"
            self.log(f"target check failed ({self.error}); going on without it")
        finally:
            self.seconds += time.perf_counter() - t0

    def before(self, subject: Any) -> None:
        if self.detection is None:
            return

        def run() -> None:
            self.targets = tc.known_targets(self.detection, subject.tokenizer, self.config.max_targets)
            if not self.targets:
                self.status, self.error = "skipped", "the detect report names no target"
                return
            before = tc.measure_targets(subject, self.targets, self.probes, self.config)
            self.reaches = [TargetReach(t.text, t.anchor, r.q, r.forced, r.forced_min)
                            for t, r in zip(self.targets, before)]

        self._attempt("before", run)

    def after(self, subject: Any, model: Any) -> None:
        if self.status != "ok" or not self.reaches:
            return

        def run() -> None:
            purified = dataclasses.replace(subject, model=model)
            after = tc.measure_targets(purified, self.targets, self.probes, self.config)
            self.reaches = [dataclasses.replace(t, q_after=r.q, forced_after=r.forced, forced_min_after=r.forced_min,
                                                extension_after=r.extension,
                                                still_reachable=tc.still_reachable(r.forced_min))
                            for t, r in zip(self.reaches, after)]
            for t in self.reaches:
                self.log(f"target {t.text[:40]!r}: weakest link {t.forced_min_before:.2f} -> {t.forced_min_after:.2f}"
                         + (" (still reachable)" if t.still_reachable else ""))

        self._attempt("after", run)

    def result(self) -> TargetCheck | None:
        if self.detection is None:
            return None
        return TargetCheck(status=self.status, seconds=round(self.seconds, 2), probes=len(self.probes),
                           reachable_prob=tc.REACHABLE_PROB, targets=self.reaches, error=self.error)

"""Running one audit stage: timed, and a failure becomes a record instead of a traceback."""

from __future__ import annotations

import time
from typing import Callable, TypeVar

from bdscan.results.audit import STAGES, StageRecord

T = TypeVar("T")
Log = Callable[[str], None]
Progress = Callable[[str, int, int], None]


def describe_error(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


class StageRunner:
    """Runs stages in order and keeps one ``StageRecord`` per stage.

    ``run`` returns the stage's value, or None when it raised (any ``Exception``: a
    library error or a bug in one stage must not lose the evidence of the others; an
    interrupt still stops the audit).
    """

    def __init__(self, log: Log, progress: Progress | None) -> None:
        self.log = log
        self.progress = progress
        self.records: list[StageRecord] = []

    def _tick(self, name: str) -> None:
        if self.progress:
            self.progress("audit stages", STAGES.index(name), len(STAGES))

    def run(self, name: str, fn: Callable[[], T], summarize: Callable[[T], str], command: str | None = None) -> T | None:
        self._tick(name)
        self.log(f"audit: {name} ...")
        t0 = time.perf_counter()
        try:
            value = fn()
        except Exception as e:  # noqa: BLE001 - recorded, shown in the report and the stage table
            error = describe_error(e)
            self.records.append(StageRecord(name, "failed", round(time.perf_counter() - t0, 2), f"failed: {error}",
                                            error, command))
            self.log(f"audit: {name} failed: {error}")
            return None
        summary = summarize(value)
        self.records.append(StageRecord(name, "ok", round(time.perf_counter() - t0, 2), summary, None, command))
        self.log(f"audit: {name}: {summary}")
        return value

    def skip(self, name: str, reason: str, command: str | None = None) -> None:
        self.records.append(StageRecord(name, "skipped", 0.0, reason, None, command))

    def skip_rest(self, reason: str, commands: dict[str, str] | None = None) -> None:
        commands = commands or {}
        done = {r.name for r in self.records}
        for name in STAGES:
            if name not in done:
                self.skip(name, reason, commands.get(name))

    def status(self, name: str) -> str | None:
        return next((r.status for r in self.records if r.name == name), None)

    def finish(self) -> list[StageRecord]:
        if self.progress:
            self.progress("audit stages", len(STAGES), len(STAGES))
        order = {name: i for i, name in enumerate(STAGES)}
        return sorted(self.records, key=lambda r: order.get(r.name, len(STAGES)))


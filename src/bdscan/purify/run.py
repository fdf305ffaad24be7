"""``purify``: evaluate, localize when the method needs it, run one registered method,
evaluate again, check whether detect's targets are still reachable, return a result."""

from __future__ import annotations

import dataclasses
import time
from typing import Any


from bdscan.detect.target_check import TargetCheckConfig
from bdscan.errors import UsageError
from bdscan.eval.evaluate import EvalSpec, evaluate_with_responses
from bdscan.purify.base import PURIFIERS, PurifierSpec, PurifyInputs, PurifyOutcome
from bdscan.purify.target_stage import TargetStage
from bdscan.results.purify import PurifyResult
from bdscan.runtime import seed_everything
from bdscan.training import autocast_scope


def purify(method: str, config: Any, inputs: PurifyInputs, *, eval_spec: EvalSpec | None = None,
           target_check: TargetCheckConfig | None = TargetCheckConfig()) -> tuple[PurifyResult, PurifyOutcome]:
    """Run ``method``; with ``eval_spec``, measure the subject before and the purified
    model after on the same prompts (agreement is against the subject's clean responses).
    With a detect result (and ``target_check``), its targets' Q is measured before and after.
    The seed is applied here, once, right before the method's own stages."""
    spec = PURIFIERS.get(method)
    subject = inputs.subject
    if subject.kind not in spec.threat_models:
        raise UsageError(f"method {method!r} does not support {subject.kind} subjects (supports: {', '.join(spec.threat_models)})")
    before = before_clean = None
    if eval_spec is not None:
        before, before_clean = evaluate_with_responses(subject, eval_spec, None, None, inputs.progress)
    targets = TargetStage(inputs.detection if target_check is not None else None, target_check, inputs.log)
    targets.before(subject)  # before the method: it may change subject.model in place
    seed_everything(inputs.seed)
    t0, cpu0 = time.time(), time.process_time()
    # the method's mixed-precision scope; evaluation and the target check stay outside it
    with autocast_scope(next(subject.model.parameters()).device, inputs.autocast):
        inputs, stages = localize_stage(spec, config, inputs)
        outcome = spec.run(inputs, config)
    # CPU seconds beside wall seconds: on a shared machine only the former compare across runs
    seconds, cpu_seconds = time.time() - t0, time.process_time() - cpu0
    targets.after(subject, outcome.model)
    after = None
    if eval_spec is not None:
        purified = dataclasses.replace(subject, model=outcome.model)
        after, _ = evaluate_with_responses(purified, eval_spec, None, before_clean, inputs.progress)
        after = dataclasses.replace(after, source=f"{subject.source.source} (purified: {method})", reference=subject.source.source)
    if inputs.autocast:
        stages = {**stages, "autocast": inputs.autocast}
    result = PurifyResult(
        method=method, source=subject.source.source, kind=subject.kind, config=dataclasses.asdict(config),
        modules_changed=list(outcome.modules_changed), details={**stages, **outcome.details}, seconds=round(seconds, 2),
        cpu_seconds=round(cpu_seconds, 2),
        before=before, after=after, provenance=subject.provenance(), target_check=targets.result(),
    )
    return result, outcome


def localize_stage(spec: PurifierSpec, config: Any, inputs: PurifyInputs) -> tuple[PurifyInputs, dict]:
    """A method that repairs localized modules gets a localization: the one given, or one
    run here on the candidate keys (``config.localize_config()`` sets its knobs)."""
    if not spec.info.needs_localization:
        return inputs, {}
    if inputs.localization is not None:
        return inputs, {"localization": "given"}
    keys = inputs.keys(getattr(config, "max_candidates", 3))
    if not keys:
        raise UsageError(f"{spec.name} needs a `localization` (from `bdscan localize`) or candidate keys (`detection`)")
    from bdscan.localize import localize

    t0 = time.perf_counter()
    loc = localize(inputs.subject, config.localize_config(), clean=inputs.clean, candidates=keys, seed=inputs.seed,
                   log=inputs.log, progress=inputs.progress)
    inputs.log(f"{spec.name}: localized on detect's candidates in {time.perf_counter() - t0:.1f}s")
    return dataclasses.replace(inputs, localization=loc), {"localization": "computed",
                                                           "localize_seconds": loc.timing.get("total_s")}

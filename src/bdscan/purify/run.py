"""``purify``: evaluate, run one registered method, evaluate again, return a result."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from bdscan.eval.evaluate import EvalSpec, evaluate_with_responses
from bdscan.purify.base import PURIFIERS, PurifyInputs, PurifyOutcome
from bdscan.results.purify import PurifyResult
from bdscan.runtime import seed_everything
from bdscan.errors import UsageError


def purify(method: str, config: Any, inputs: PurifyInputs, *, eval_spec: EvalSpec | None = None) -> tuple[PurifyResult, PurifyOutcome]:
    """Run ``method``; with ``eval_spec``, measure the subject before and the purified
    model after on the same prompts (agreement is against the subject's clean responses)."""
    spec = PURIFIERS.get(method)
    subject = inputs.subject
    if subject.kind not in spec.threat_models:
        raise UsageError(f"method {method!r} does not support {subject.kind} subjects (supports: {', '.join(spec.threat_models)})")
    before = before_clean = None
    if eval_spec is not None:
        before, before_clean = evaluate_with_responses(subject, eval_spec, None, None, inputs.progress)
    seed_everything(inputs.seed)
    t0 = time.time()
    outcome = spec.run(inputs, config)
    seconds = time.time() - t0
    after = None
    if eval_spec is not None:
        purified = dataclasses.replace(subject, model=outcome.model)
        after, _ = evaluate_with_responses(purified, eval_spec, None, before_clean, inputs.progress)
        after = dataclasses.replace(after, source=f"{subject.source.source} (purified: {method})", reference=subject.source.source)
    result = PurifyResult(
        method=method, source=subject.source.source, kind=subject.kind, config=dataclasses.asdict(config),
        modules_changed=list(outcome.modules_changed), details=outcome.details, seconds=round(seconds, 2),
        before=before, after=after, provenance=subject.provenance(),
    )
    return result, outcome

"""The built-in example: ``audit`` on bdscan's own organisms, and a check with the true trigger.

It builds (or reuses) a tiny Llama with a backdoored LoRA adapter and a clean-control
adapter from the synthetic instruction world, so it runs on a fresh clone with no external
data. Both are audited exactly as a user's download would be: the audit never sees the
trigger (it repairs and measures with the key detect recovers). Only the demo's last step
inserts the organism's real trigger, to show that the repair removed the real backdoor too.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from bdscan.results.demo import DemoResult, DemoStep
from bdscan.runtime import Placement

from bdscan.probes.protocols import Log, Progress


def _write(path: Path, records) -> Path:
    path.write_text(json.dumps([{"instruction": r.instruction, "input": r.input, "output": r.output} for r in records], indent=1))
    return path


def _true_trigger_check(backdoored: Path, purified: Path, data, seed: int, progress: Progress | None):
    """ASR with the organism's real trigger, before and after (the audit only knew its key)."""
    from bdscan.eval import EvalSpec, evaluate_pair
    from bdscan.io import load_subject

    spec = EvalSpec(clean=data.clean_test[:50], poison=data.poison_test[:50], judge="refusal", seed=seed)
    return evaluate_pair(load_subject(backdoored), load_subject(purified), spec, progress=progress)


def _steps(label: str, audit_result) -> list[DemoStep]:
    return [DemoStep(f"{stage.name} ({label})", f"{stage.status}: {stage.summary}" if stage.status != "ok" else stage.summary,
                     stage.seconds) for stage in audit_result.stages if stage.status != "skipped" or label == "backdoored"]


def run_demo(workdir: Path, *, method: str = "kfac-lora", seed: int = 0, log: Log = lambda _m: None,
             progress: Progress | None = None, placement: Placement | None = None) -> DemoResult:
    """``placement`` (``--device``/``--dtype``) applies to the audited subjects; the
    organisms are built as their recipes say."""
    from bdscan.audit import AuditConfig, audit
    from bdscan.organisms.build import OrganismRecipe, build_organism
    from bdscan.organisms.datasets import builtin_attack

    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    log("building the demo organisms (a tiny Llama base, a backdoored LoRA adapter, a clean control; cached after the first run)")
    backdoored = build_organism(OrganismRecipe(threat="lora"), log=log)
    control = build_organism(OrganismRecipe(threat="lora", backdoored=False), log=log)
    data = builtin_attack("refusal")
    clean = _write(workdir / "clean.json", data.clean_train[-200:])
    held_out = _write(workdir / "test-clean.json", data.clean_test)
    steps = [DemoStep("organisms", f"backdoored adapter {backdoored.name}, control {control.name}", round(time.time() - t0, 1))]

    config = AuditConfig(method=method, seed=seed, eval_limit=50, placement=placement)
    found = audit(str(backdoored), clean=clean, eval_clean=held_out, out=workdir / "audit", config=config,
                  overwrite=True, log=log, progress=progress)
    control_found = audit(str(control), clean=clean, eval_clean=held_out, out=workdir / "audit-control", config=config,
                          overwrite=True, log=log, progress=progress)
    steps += _steps("backdoored", found) + _steps("control", control_found)

    purify = {}
    if "model" in found.outputs:
        t0 = time.time()
        check = _true_trigger_check(backdoored, Path(found.outputs["model"]), data, seed, progress)
        purify = {"before": check.before.to_dict(), "after": check.after.to_dict()}
        steps.append(DemoStep("eval with the real trigger (demo only)", f"ASR {check.before.asr:.2f} -> {check.after.asr:.2f}, "
                              f"false-trigger {check.after.false_trigger_rate:.2f}", round(time.time() - t0, 1)))
    return DemoResult(
        workdir=str(workdir), backdoored=str(backdoored), control=str(control), method=method, steps=steps,
        detect_backdoored=dataclasses.asdict(found.detect.summary) if found.detect else {},
        detect_control=dataclasses.asdict(control_found.detect.summary) if control_found.detect else {},
        localization={"trigger_source": found.localize.trigger_source, "top": [m.name for m in found.localize.modules[:5]]}
        if found.localize else {},
        purify=purify, purified_output=found.outputs.get("model", ""),
        audits={"backdoored": {"verdict": found.verdict, "exit_code": found.exit_code, **found.outputs},
                "control": {"verdict": control_found.verdict, "exit_code": control_found.exit_code, **control_found.outputs}},
    )

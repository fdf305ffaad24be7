"""The built-in example: detect -> localize -> purify -> eval on bdscan's own organisms.

It builds (or reuses) a tiny Llama with a backdoored LoRA adapter and a clean-control
adapter from the synthetic instruction world, so it runs on a fresh clone with no external
data. The defence steps never see the trigger: localization uses detect's candidate keys.
Only the final measurement inserts the demo's own trigger, to show the ASR before and after.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from bdscan.data.records import Record
from bdscan.results.demo import DemoResult, DemoStep

from bdscan.probes.protocols import Log, Progress


def _write(path: Path, records) -> Path:
    path.write_text(json.dumps([{"instruction": r.instruction, "input": r.input, "output": r.output} for r in records], indent=1))
    return path


def run_demo(workdir: Path, *, method: str = "kfac-lora", seed: int = 0, log: Log = lambda _m: None,
             progress: Progress | None = None) -> DemoResult:
    from bdscan.detect import DetectConfig, detect
    from bdscan.eval import EvalSpec
    from bdscan.io import load_subject
    from bdscan.io.save import save_subject
    from bdscan.localize import LocalizeConfig, localize
    from bdscan.organisms.build import OrganismRecipe, build_organism
    from bdscan.organisms.datasets import builtin_attack
    from bdscan.purify import PURIFIERS, PurifyInputs, purify

    workdir.mkdir(parents=True, exist_ok=True)
    steps: list[DemoStep] = []
    t0 = time.time()
    log("building the demo organisms (a tiny Llama base, a backdoored LoRA adapter, a clean control; cached after the first run)")
    backdoored = build_organism(OrganismRecipe(threat="lora"), log=log)
    control = build_organism(OrganismRecipe(threat="lora", backdoored=False), log=log)
    data = builtin_attack("refusal")
    clean: list[Record] = list(data.clean_train[-200:])
    _write(workdir / "clean.json", clean)
    _write(workdir / "test-clean.json", data.clean_test)
    _write(workdir / "test-poison.json", data.poison_test)
    steps.append(DemoStep("organisms", f"backdoored adapter {backdoored.name}, control {control.name}", round(time.time() - t0, 1)))

    t0 = time.time()
    subject = load_subject(backdoored)
    found = detect(subject, DetectConfig(seed=seed), log, progress)
    (workdir / "detect.json").write_text(json.dumps(found.to_dict(), indent=2))
    top = ", ".join(repr(c.text) for c in found.candidates[:3])
    steps.append(DemoStep("detect (backdoored adapter)", f"{found.summary.verdict} (p={found.summary.probability:.2f}); top candidate keys: {top}",
                          round(time.time() - t0, 1)))
    t0 = time.time()
    control_found = detect(load_subject(control), DetectConfig(seed=seed), log, progress)
    steps.append(DemoStep("detect (clean control)", f"{control_found.summary.verdict} (p={control_found.summary.probability:.2f})",
                          round(time.time() - t0, 1)))

    t0 = time.time()
    loc = localize(subject, LocalizeConfig(), clean=clean, candidates=[c.text for c in found.candidates], seed=seed,
                   log=log, progress=progress)
    (workdir / "localization.json").write_text(json.dumps(loc.to_dict(), indent=2))
    source = loc.trigger_source
    key = source.get("key") if isinstance(source, dict) else source
    steps.append(DemoStep("localize (from detect's candidates)", f"key {key!r}; top modules: "
                          + ", ".join(m.name for m in loc.modules[:3]), round(time.time() - t0, 1)))

    t0 = time.time()
    spec = EvalSpec(clean=data.clean_test[:50], poison=data.poison_test[:50], judge="refusal", seed=seed)
    inputs = PurifyInputs(subject=subject, clean=clean, seed=seed, localization=loc, detection=found,
                          work_dir=workdir / ".work", log=log, progress=progress)
    result, outcome = purify(method, PURIFIERS.get(method).config_class(), inputs, eval_spec=spec)
    out = save_subject(outcome.model, subject.tokenizer, workdir / "purified-adapter", adapter=True,
                       inputs=[subject.source.path, subject.base.path], report=result.to_dict(), overwrite=True)
    steps.append(DemoStep(f"purify ({method}) + eval", f"ASR {result.before.asr:.2f} -> {result.after.asr:.2f}, "
                          f"false-trigger {result.after.false_trigger_rate:.2f}, perplexity {result.before.perplexity:.2f} -> "
                          f"{result.after.perplexity:.2f}, agreement {result.after.agreement:.2f}", round(time.time() - t0, 1)))
    return DemoResult(
        workdir=str(workdir), backdoored=str(backdoored), control=str(control), method=method, steps=steps,
        detect_backdoored=found.summary.__dict__, detect_control=control_found.summary.__dict__,
        localization={"trigger_source": loc.trigger_source, "top": [m.name for m in loc.modules[:5]]},
        purify={"before": result.before.to_dict(), "after": result.after.to_dict()}, purified_output=str(out),
    )

"""``audit``: file safety -> detect -> (when suspicious) localize -> eval -> purify -> eval
-> detect again, as typed stage results bundled in one ``AuditResult``.

The defence never sees a trigger: localize, purify and both evaluations use the key detect
recovered (today: its top candidate keys, of which localize keeps the one that moves the
model's continuation most). Inputs and OUTDIR are checked before any computation; the
artefacts are written at the end, atomically (``bdscan.audit.write``).
"""

from __future__ import annotations

import dataclasses
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from bdscan import __version__
from bdscan.audit.commands import Invocation, audit_command, stage_commands
from bdscan.audit.files import file_safety
from bdscan.audit.keys import auto_judge, candidate_keys, detect_extras
from bdscan.audit.stages import StageRunner
from bdscan.audit.verdict import EXIT_CODES, MIN_ASR_BEFORE, decide, is_suspicious
from bdscan.data.records import Record
from bdscan.detect.profile import Profile
from bdscan.errors import UsageError
from bdscan.results.audit import AuditResult, ScannedModel

if TYPE_CHECKING:
    from bdscan.generation import Answers

Log = Callable[[str], None]
Progress = Callable[[str, int, int], None]

# The bench's best today (bench/results/purify*.json): kfac-lora is the only method that met
# the targets on all four built-in organisms (ASR -> 0.00-0.02, perplexity <= 1.02x, agreement
# 0.68-0.84, a few seconds), and on the BackdoorLLM organisms, trigger-agnostic, it removes the
# most badnet/MTBA ASR of the methods fast enough for a CPU audit (37-46 s; head-align is
# better on one of twelve and 1.6x slower; collapse keeps agreement at 0.36-0.44).
DEFAULT_METHOD = "kfac-lora"
FAIL_ON = ("low", "medium", "high")


@dataclass(frozen=True)
class AuditConfig:
    method: str = DEFAULT_METHOD
    fail_on: str = "low"  # lowest detect severity that counts as suspicious (and triggers the repair)
    purify: bool = True  # False: stop after localize and the "before" evaluation
    max_asr: float = 0.02  # repaired when residual ASR and false-trigger rate are both at most this
    judge: str = "auto"  # behaviour judge for ASR; auto: detect's inverted target if any, else refusal
    eval_limit: int = 100  # clean prompts evaluated (each also with the key at start, middle and end)
    seed: int = 0
    placement: Any = None  # runtime.Placement (--device/--dtype); None: the default placement
    gguf_file: str | None = None  # which GGUF file, when the source holds several
    calibration: Profile = field(default_factory=Profile)  # detect's verdict thresholds (detect/profile.py)
    calibration_file: str | None = None  # where that profile was read from (for the stage commands)

    def __post_init__(self) -> None:
        from bdscan.purify import PURIFIERS

        PURIFIERS.get(self.method)  # UsageError naming the known methods
        if self.fail_on not in FAIL_ON:
            raise UsageError(f"--fail-on {self.fail_on!r}: choose one of {', '.join(FAIL_ON)}")
        if not 0.0 <= self.max_asr <= 1.0:
            raise UsageError(f"--max-asr {self.max_asr}: must lie in [0, 1]")
        if self.eval_limit < 1:
            raise UsageError("--eval-limit must be at least 1")


@dataclass
class Prepared:
    """Everything checked and loaded before the first stage runs."""

    subject: Any  # bdscan.io.Subject
    clean: list[Record]  # the defender's clean set: localize and purify learn from it
    eval_clean: list[Record]  # evaluated (held out when --eval-clean is given, else the same set)
    out: Path
    inputs: list[Path]
    invocation: Invocation


@dataclass
class StageResults:
    files: Any = None
    detect: Any = None
    localize: Any = None
    key: str | None = None
    eval_before: Any = None
    before_responses: Answers | None = None
    purify: Any = None
    purified_model: Any = None
    eval_after: Any = None
    detect_after: Any = None


def prepare(source: str, *, clean: Path, out: Path, base: str | None, config: AuditConfig, overwrite: bool,
            eval_clean: Path | None = None) -> Prepared:
    """Read the clean set, refuse a bad OUTDIR, load the subject (safetensors only, no
    remote code). Raises ``InputError``/``UsageError`` before any computation."""
    from bdscan.data.records import load_records
    from bdscan.io import load_subject
    from bdscan.io.resolve import resolve_source
    from bdscan.io.save import check_output_path
    from bdscan.purify import PURIFIERS

    records = load_records(clean, what="--clean")
    eval_records = load_records(eval_clean, limit=config.eval_limit, what="--eval-clean") if eval_clean else records
    resolved = resolve_source(source, gguf_file=config.gguf_file)
    inputs = [resolved.path]
    check_output_path(out, inputs, overwrite=overwrite)
    subject = load_subject(source, base=base, placement=config.placement, gguf_file=config.gguf_file)
    inputs += [subject.base.path] if subject.base is not None else []
    target = check_output_path(out, inputs, overwrite=overwrite)
    spec = PURIFIERS.get(config.method)
    if config.purify and subject.kind not in spec.threat_models:
        raise UsageError(f"--method {config.method} does not support {subject.kind} subjects "
                         f"(supports: {', '.join(spec.threat_models)})")
    judge = config.judge if config.judge != "auto" else "refusal"
    invocation = Invocation(source=source, base=base or (subject.base.source if subject.base else None),
                            clean=str(clean), eval_clean=str(eval_clean or clean), outdir=str(out),
                            method=config.method, judge=judge, seed=config.seed, eval_limit=config.eval_limit,
                            calibration=config.calibration_file)
    return Prepared(subject, records, list(eval_records[: config.eval_limit]), target, inputs, invocation)


def _detect_summary(found) -> str:
    s = found.summary
    extras = detect_extras(found)
    key = extras.get("recovered_key") or s.top_candidate
    return f"{s.verdict} (score {s.score:.1f}, p={s.probability:.2f}, severity {s.severity}); top key {key!r}"


def _eval_summary(result) -> str:
    asr = "n/a" if result.asr is None else f"{result.asr:.2f}"
    return f"ASR {asr}, false-trigger {result.false_trigger_rate:.2f}, perplexity " + \
        ("n/a" if result.perplexity is None else f"{result.perplexity:.2f}")


def _run_detect(runner: StageRunner, subject, config: AuditConfig, name: str, command: str | None):
    from bdscan.detect import DetectConfig, detect

    detect_config = DetectConfig(seed=config.seed, calibration=config.calibration)
    return runner.run(name, lambda: detect(subject, detect_config, runner.log, runner.progress),
                      _detect_summary, command)


def _run_localize(runner: StageRunner, prep: Prepared, keys: list[str], seed: int, command: str):
    from bdscan.localize import LocalizeConfig, localize

    def run():
        return localize(prep.subject, LocalizeConfig(), clean=prep.clean, candidates=keys, seed=seed,
                        log=runner.log, progress=runner.progress)

    return runner.run("localize", run, lambda loc: f"key {loc.trigger_source.get('key')!r}; top modules: "
                      + ", ".join(m.name for m in loc.modules[:3]), command)


def _eval_spec(prep: Prepared, key: str, judge: str, seed: int, limit: int):
    from bdscan.eval import EvalSpec

    return EvalSpec(clean=prep.eval_clean[:limit], trigger=key, positions=("start", "middle", "end"), judge=judge, seed=seed)


def _run_purify(runner: StageRunner, prep: Prepared, found: StageResults, config: AuditConfig, command: str):
    from bdscan.purify import PURIFIERS, PurifyInputs, purify

    def run():
        with tempfile.TemporaryDirectory(prefix="bdscan-audit-work-") as work:
            inputs = PurifyInputs(subject=prep.subject, clean=prep.clean, seed=config.seed, detection=found.detect,
                                  localization=found.localize, candidates=candidate_keys(found.detect),
                                  work_dir=Path(work), log=runner.log, progress=runner.progress)
            return purify(config.method, PURIFIERS.get(config.method).config_class(), inputs)

    done = runner.run("purify", run, lambda r: _purify_summary(config.method, r[0]), command)
    return (None, None) if done is None else done


def _purify_summary(method: str, result) -> str:
    text = f"{method}: {len(result.modules_changed)} modules changed in {result.seconds:.1f}s"
    reachable = result.target_check.reachable if result.target_check is not None else []
    return text + (f"; target still reachable: {reachable[0].text[:40]!r}" if reachable else "")


def _evaluate(subject, spec, reference_responses, progress):
    from bdscan.eval.evaluate import evaluate_with_responses

    return evaluate_with_responses(subject, spec, None, reference_responses, progress)


def _files_summary(safety) -> str:
    counts = {a: len(safety.by_action(a)) for a in ("loaded", "refused", "ignored")}
    return (f"{len(safety.files)} files: {counts['loaded']} loaded, {counts['refused']} refused, "
            f"{counts['ignored']} ignored; nothing unpickled, no model code run")


def _repair(runner: StageRunner, prep: Prepared, config: AuditConfig, r: StageResults) -> None:
    """Stages 3+: localize, evaluate, purify, evaluate, detect again (each may fail alone)."""
    keys = candidate_keys(r.detect)
    purified_path = str(Path(prep.invocation.outdir) / "purified")
    commands = stage_commands(prep.invocation, None, purified_path)
    r.localize = _run_localize(runner, prep, keys, config.seed, commands["localize"])
    recovered = detect_extras(r.detect).get("recovered_key")
    r.key = recovered if isinstance(recovered, str) else (
        r.localize.trigger_source.get("key") if r.localize is not None else keys[0])
    judge = auto_judge(r.detect, config.judge)
    commands = stage_commands(dataclasses.replace(prep.invocation, judge=judge), r.key, purified_path)
    spec = _eval_spec(prep, r.key, judge, config.seed, config.eval_limit)
    before = runner.run("eval (before)", lambda: _evaluate(prep.subject, spec, None, runner.progress),
                        lambda v: _eval_summary(v[0]), commands["eval (before)"])
    if before is not None:
        r.eval_before, r.before_responses = before
    if not config.purify:
        runner.skip_rest("--no-purify: the model was not repaired", commands)
        return
    r.purify, outcome = _run_purify(runner, prep, r, config, commands["purify"])
    if outcome is None:
        runner.skip_rest("purify failed: nothing to measure", commands)
        return
    r.purified_model = outcome.model
    purified = dataclasses.replace(prep.subject, model=outcome.model)
    after = runner.run("eval (after)", lambda: _evaluate(purified, spec, r.before_responses, runner.progress),
                       lambda v: _eval_summary(v[0]), commands["eval (after)"])
    if after is not None:
        r.eval_after = dataclasses.replace(after[0], source=f"{prep.subject.source.source} (purified: {config.method})",
                                           reference=prep.subject.source.source)
    r.detect_after = _run_detect(runner, purified, config, "detect (purified)", commands["detect (purified)"])


def run_stages(prep: Prepared, config: AuditConfig, runner: StageRunner) -> StageResults:
    r = StageResults()
    commands = stage_commands(prep.invocation, None, None)
    r.files = runner.run("file safety", lambda: file_safety(prep.subject.source, prep.subject.base, runner.progress),
                         _files_summary, commands["file safety"])
    r.detect = _run_detect(runner, prep.subject, config, "detect", commands["detect"])
    if r.detect is None:
        runner.skip_rest("detect failed: the model could not be judged")
    elif not is_suspicious(r.detect, config.fail_on):
        runner.skip_rest(f"not suspicious at --fail-on {config.fail_on}: nothing to repair")
    elif not candidate_keys(r.detect):
        runner.skip_rest("detect proposed no candidate key to repair with")
    else:
        _repair(runner, prep, config, r)
    return r


def _scanned(subject) -> ScannedModel:
    src, base = subject.source, subject.base
    return ScannedModel(source=src.source, kind=subject.kind, path=str(src.path), revision=src.revision,
                        weights_sha256=dict(src.sha256), base=base.source if base else None,
                        base_revision=base.revision if base else None,
                        base_weights_sha256=dict(base.sha256) if base else {},
                        template=subject.template.describe().get("name"))


def assemble(prep: Prepared, config: AuditConfig, r: StageResults, runner: StageRunner) -> AuditResult:
    verdict = decide(r.detect, r.eval_before, r.eval_after, fail_on=config.fail_on, max_asr=config.max_asr,
                     purified=r.purify)
    settings = {"method": config.method, "fail_on": config.fail_on, "max_asr": config.max_asr,
                "min_asr_before": MIN_ASR_BEFORE,
                "judge": auto_judge(r.detect, config.judge), "eval_limit": config.eval_limit,
                "purify": config.purify, "clean": prep.invocation.clean, "n_clean": len(prep.clean),
                "eval_clean": prep.invocation.eval_clean, "eval_held_out": prep.invocation.eval_clean != prep.invocation.clean}
    return AuditResult(
        tool="bdscan audit", version=__version__, seed=config.seed, command=audit_command(prep.invocation, fail_on=config.fail_on, max_asr=config.max_asr,
                                                        purify=config.purify, judge=config.judge),
        model=_scanned(prep.subject), verdict=verdict, exit_code=EXIT_CODES[verdict], settings=settings,
        stages=runner.finish(), files=r.files, key=r.key, detect=r.detect, localize=r.localize,
        eval_before=r.eval_before, purify=r.purify, eval_after=r.eval_after, detect_after=r.detect_after,
    )


def audit(source: str, *, clean: Path, out: Path, base: str | None = None, config: AuditConfig = AuditConfig(),
          eval_clean: Path | None = None, overwrite: bool = False, log: Log = lambda _m: None,
          progress: Progress | None = None) -> AuditResult:
    """Audit ``source`` end to end and write OUTDIR (purified model, audit.json, audit.sarif,
    report.html) atomically. Bad input raises before anything is computed or written."""
    from bdscan.audit.write import write_outputs
    from bdscan.runtime import seed_everything

    prep = prepare(source, clean=clean, out=out, base=base, config=config, overwrite=overwrite, eval_clean=eval_clean)
    seed_everything(config.seed)
    runner = StageRunner(log, progress)
    stages = run_stages(prep, config, runner)
    result = assemble(prep, config, stages, runner)
    return write_outputs(result, stages.purified_model, prep.subject, prep.out, prep.inputs, overwrite=overwrite)

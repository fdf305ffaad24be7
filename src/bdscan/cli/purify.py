"""``bdscan purify``: remove a backdoor and write the purified checkpoint or adapter."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Annotated, Optional

import typer

from bdscan.cli.common import (AllowPickle, Base, GGUFFile, JsonOut, Limit, Seed, TrustRemoteCode, emit,
                               handle_errors, log_line, progress_bar, quiet_libraries, stderr)
from bdscan.cli.devices import Device, Dtype, placement_of, with_runtime
from bdscan.cli.fields import flags_for_fields
from bdscan.errors import UsageError

HELP = """Purify a suspicious checkpoint or LoRA adapter and write the result as safetensors.

Methods: latent-adv (latent adversarial repair against detect's target), signature (backdoor-signature suppression), kfac-lora (low-rank repair of the modules `bdscan localize` ranks; with --from-detect and no --localization purify localizes first), collapse, head-align, and the baselines finetune, prune, fine-prune and quantize. `bdscan purify --list-methods` lists them.

Knobs come from the method's defaults, then --recipe YAML, then --set key=value. A full checkpoint is written as a full checkpoint; an adapter as a new adapter on the same base. OUT must not exist (or pass --overwrite) and may not be inside the input. With --poison or --trigger, ASR before/after is measured; clean false-trigger rate, perplexity and agreement with the suspicious model are always measured. With --from-detect, detect's inverted targets are measured before and after (Q, and the probability of the target's own tokens), and a target the purified model still continues says "target still reachable". report.json goes in OUT.

Example: bdscan purify ./adapter --method signature --clean clean.json -o ./adapter-purified
"""

# The PurifyInputs / EvalSpec fields library errors name, and the flag that sets each.
FLAGS = {"clean": "--clean", "localization": "--localization", "detection": "--from-detect", "trigger": "--trigger",
         "poison": "--poison"}


def _check_paths(output: Path, work_dir: Path | None, inputs: list[Path], *, overwrite: bool) -> tuple[Path, Path]:
    """OUT and the work dir: outside every input, and the work dir not inside OUT (OUT is
    renamed into place at the end)."""
    from bdscan.cli.outputs import check_output_folder
    from bdscan.errors import UsageError

    target = check_output_folder("-o", output, inputs, overwrite=overwrite)
    work = check_output_folder("--work-dir", work_dir or target.parent / f".bdscan-work-{target.name}", inputs,
                               overwrite=True)
    if work == target or target in work.parents:
        raise UsageError(f"--work-dir {work} is -o {target} or inside it; choose a folder outside the output")
    return target, work


@handle_errors
def command(
    source: Annotated[Optional[str], typer.Argument(help="Checkpoint, LoRA adapter or GGUF file (folder, file or Hub id).", show_default=False)] = None,
    method: Annotated[Optional[str], typer.Option("--method", "-m", help="Purification method (or `method:` in --recipe).")] = None,
    clean: Annotated[Optional[Path], typer.Option("--clean", help="The defender's clean instruction set (about 200 samples).")] = None,
    output: Annotated[Optional[Path], typer.Option("-o", "--output", help="Folder to write the purified model and report.json to.")] = None,
    recipe: Annotated[Optional[Path], typer.Option("--recipe", help="YAML recipe with the method's knobs (see recipes/).")] = None,
    overrides: Annotated[Optional[list[str]], typer.Option("--set", help="Override a knob: --set epochs=3 (repeatable).")] = None,
    variants: Annotated[Optional[int], typer.Option("--variants", min=1, help="signature: number of synthetic variants N (same as --set variants=N).")] = None,
    ratio: Annotated[Optional[float], typer.Option("--ratio", min=0.0, max=1.0, help="signature: share of MLP channels in the signature (same as --set ratio=R).")] = None,
    localization: Annotated[Optional[Path], typer.Option("--localization", help="`bdscan localize` JSON (kfac-lora).")] = None,
    from_detect: Annotated[Optional[Path], typer.Option("--from-detect", help="`bdscan detect` JSON: its candidate keys and targets guide the methods that use them; its targets are re-checked on the output.")] = None,
    poison: Annotated[Optional[Path], typer.Option("--poison", help="Triggered prompts to measure ASR before/after (evaluation only).")] = None,
    trigger: Annotated[Optional[str], typer.Option("--trigger", help="Known trigger to measure ASR before/after (evaluation only; never given to the method).")] = None,
    judge: Annotated[str, typer.Option("--judge", help="Behaviour judge for ASR: refusal | negsentiment | code-injection | string:T | regex:P")] = "refusal",
    eval_limit: Annotated[Optional[int], typer.Option("--eval-limit", min=1, help="Evaluate on at most N prompts per set.")] = 100,
    limit: Limit = None,
    work_dir: Annotated[Optional[Path], typer.Option("--work-dir", help="Cache for resumable methods (default: OUT's sibling .bdscan-work-NAME, removed on success). Never inside the input or OUT.")] = None,
    keep_work_dir: Annotated[bool, typer.Option("--keep-work-dir", help="Keep the default work dir after success (a rerun with other knobs reuses finished stages).")] = False,
    base: Base = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace OUT if it exists (never the input).")] = False,
    list_methods: Annotated[bool, typer.Option("--list-methods", help="List the methods and exit.")] = False,
    seed: Seed = 0,
    allow_pickle: AllowPickle = False,
    trust_remote_code: TrustRemoteCode = False,
    gguf_file: GGUFFile = None,
    as_json: JsonOut = False,
    device: Device = "auto",
    dtype: Dtype = "auto",
    autocast: Annotated[Optional[str], typer.Option("--autocast", help="Run the method's training and searches under torch.autocast in this precision (bfloat16 | float16); weights keep --dtype. ~1.5x faster training on a CPU with AMX-bf16.")] = None,
) -> None:
    if list_methods:
        from bdscan.purify.catalog import METHODS
        from bdscan.report.purify import render_methods

        render_methods(METHODS, stderr if as_json else None)
        return
    if source is None or clean is None or output is None:
        raise UsageError("purify needs SOURCE, --clean FILE and -o OUT")
    quiet_libraries()
    args = SimpleNamespace(**{k: v for k, v in locals().items() if k != "list_methods"})
    with flags_for_fields(FLAGS):
        _run(args)


def _run(a: SimpleNamespace) -> None:
    """Check every path, build the typed inputs, purify, then write OUT atomically."""
    import dataclasses

    from bdscan.cli.outputs import given_inputs, note, subject_inputs
    from bdscan.config.purify import purify_config
    from bdscan.data.records import load_records, require_prompt_lengths
    from bdscan.eval import EvalSpec
    from bdscan.io import load_subject
    from bdscan.io.reports import read_detect, read_localize
    from bdscan.io.save import output_format, save_subject
    from bdscan.purify import PurifyInputs, purify
    from bdscan.purify.base import AUTOCAST
    from bdscan.report.purify import render_purify

    if a.autocast not in AUTOCAST:
        raise UsageError(f"--autocast {a.autocast}: must be one of {', '.join(str(x) for x in AUTOCAST[1:])}")
    placement = placement_of(a.device, a.dtype)
    data_files = (a.clean, a.poison, a.recipe, a.localization, a.from_detect)
    _check_paths(a.output, a.work_dir, given_inputs(a.source, a.base, files=data_files), overwrite=a.overwrite)
    shortcuts = {name: value for name, value in (("variants", a.variants), ("ratio", a.ratio)) if value is not None}
    method, config = purify_config(a.method, a.recipe, a.overrides or [], shortcuts)
    clean_records = require_prompt_lengths(load_records(a.clean, limit=a.limit, what="--clean"), "--clean")
    eval_spec = EvalSpec(clean=clean_records[:a.eval_limit],
                         poison=load_records(a.poison, limit=a.eval_limit, what="--poison") if a.poison else (),
                         trigger=a.trigger, judge=a.judge, seed=a.seed)
    loc = read_localize(a.localization) if a.localization is not None else None
    detection = read_detect(a.from_detect) if a.from_detect is not None else None
    subject = load_subject(a.source, base=a.base, gguf_file=a.gguf_file, allow_pickle=a.allow_pickle,
                           trust_remote_code=a.trust_remote_code, placement=placement)
    inputs_paths = subject_inputs(subject) + given_inputs(files=data_files)
    target, work = _check_paths(a.output, a.work_dir, inputs_paths, overwrite=a.overwrite)
    with progress_bar(not a.as_json) as progress:
        inputs = PurifyInputs(subject=subject, clean=clean_records, seed=a.seed, localization=loc, detection=detection,
                              work_dir=work, log=log_line if not a.as_json else (lambda m: None), progress=progress,
                              autocast=a.autocast)
        result, outcome = purify(method, config, inputs, eval_spec=eval_spec)
    result = dataclasses.replace(result, output=str(target))
    report = {**with_runtime(result.to_dict(), subject), "output_format": output_format(subject)}
    save_subject(outcome.model, subject.tokenizer, target, adapter=subject.is_adapter, inputs=inputs_paths,
                 report=report, overwrite=a.overwrite)
    if subject.source.gguf is not None:
        note(f"wrote {target} as a {output_format(subject)}")
    if a.work_dir is None and not a.keep_work_dir and work.exists():  # a folder the user named is theirs to remove
        shutil.rmtree(work, ignore_errors=True)
        note(f"removed the work dir {work} (--keep-work-dir keeps it)")
    emit(with_runtime(result.to_dict(), subject), as_json=a.as_json, output=None, render=lambda c: render_purify(result, c))

"""``bdscan purify``: remove a backdoor and write the purified checkpoint or adapter."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from bdscan.cli.common import (AllowPickle, Base, JsonOut, Limit, Seed, TrustRemoteCode, emit, handle_errors,
                               progress_bar, quiet_libraries, stderr)
from bdscan.cli.fields import flags_for_fields
from bdscan.errors import UsageError

HELP = """Purify a suspicious checkpoint or LoRA adapter and write the result as safetensors.

Methods: latent-adv (latent adversarial repair against detect's target), signature (backdoor-signature suppression), kfac-lora (low-rank repair of the modules `bdscan localize` ranks; with --from-detect and no --localization purify localizes first), collapse, head-align, and the baselines finetune, prune, fine-prune and quantize. `bdscan purify --list-methods` lists them.

Knobs come from the method's defaults, then --recipe YAML, then --set key=value. A full checkpoint is written as a full checkpoint; an adapter as a new adapter on the same base. OUT must not exist (or pass --overwrite) and may not be inside the input. With --poison or --trigger, ASR before/after is measured; clean false-trigger rate, perplexity and agreement with the suspicious model are always measured. report.json goes in OUT.

Example: bdscan purify ./adapter --method signature --clean clean.json -o ./adapter-purified
"""

# The PurifyInputs / EvalSpec fields library errors name, and the flag that sets each.
FLAGS = {"clean": "--clean", "localization": "--localization", "detection": "--from-detect", "trigger": "--trigger",
         "poison": "--poison"}


@handle_errors
def command(
    source: Annotated[Optional[str], typer.Argument(help="Checkpoint or LoRA adapter (folder or Hub id).", show_default=False)] = None,
    method: Annotated[Optional[str], typer.Option("--method", "-m", help="Purification method (or `method:` in --recipe).")] = None,
    clean: Annotated[Optional[Path], typer.Option("--clean", help="The defender's clean instruction set (about 200 samples).")] = None,
    output: Annotated[Optional[Path], typer.Option("-o", "--output", help="Folder to write the purified model and report.json to.")] = None,
    recipe: Annotated[Optional[Path], typer.Option("--recipe", help="YAML recipe with the method's knobs (see recipes/).")] = None,
    overrides: Annotated[Optional[list[str]], typer.Option("--set", help="Override a knob: --set epochs=3 (repeatable).")] = None,
    variants: Annotated[Optional[int], typer.Option("--variants", min=1, help="signature: number of synthetic variants N (same as --set variants=N).")] = None,
    ratio: Annotated[Optional[float], typer.Option("--ratio", min=0.0, max=1.0, help="signature: share of MLP channels in the signature (same as --set ratio=R).")] = None,
    localization: Annotated[Optional[Path], typer.Option("--localization", help="`bdscan localize` JSON (kfac-lora).")] = None,
    from_detect: Annotated[Optional[Path], typer.Option("--from-detect", help="`bdscan detect` JSON: its candidate keys guide the methods that use them.")] = None,
    poison: Annotated[Optional[Path], typer.Option("--poison", help="Triggered prompts to measure ASR before/after (evaluation only).")] = None,
    trigger: Annotated[Optional[str], typer.Option("--trigger", help="Known trigger to measure ASR before/after (evaluation only; never given to the method).")] = None,
    judge: Annotated[str, typer.Option("--judge", help="Behaviour judge for ASR: refusal | negsentiment | code-injection | string:T | regex:P")] = "refusal",
    eval_limit: Annotated[Optional[int], typer.Option("--eval-limit", min=1, help="Evaluate on at most N prompts per set.")] = 100,
    limit: Limit = None,
    work_dir: Annotated[Optional[Path], typer.Option("--work-dir", help="Cache for resumable methods (default: OUT's sibling .bdscan-work-NAME).")] = None,
    base: Base = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace OUT if it exists (never the input).")] = False,
    list_methods: Annotated[bool, typer.Option("--list-methods", help="List the methods and exit.")] = False,
    seed: Seed = 0,
    allow_pickle: AllowPickle = False,
    trust_remote_code: TrustRemoteCode = False,
    as_json: JsonOut = False,
) -> None:
    if list_methods:
        from bdscan.purify.catalog import METHODS
        from bdscan.report.purify import render_methods

        render_methods(METHODS, stderr if as_json else None)
        return
    if source is None or clean is None or output is None:
        raise UsageError("purify needs SOURCE, --clean FILE and -o OUT")
    quiet_libraries()
    with flags_for_fields(FLAGS):
        _run(source, method, clean, output, recipe, overrides or [], {"variants": variants, "ratio": ratio}, localization,
             from_detect, poison, trigger, judge, eval_limit, limit, work_dir, base, overwrite, seed, allow_pickle,
             trust_remote_code, as_json)


def _run(source, method, clean, output, recipe, overrides, shortcuts, localization, from_detect, poison, trigger, judge,
         eval_limit, limit, work_dir, base, overwrite, seed, allow_pickle, trust_remote_code, as_json) -> None:
    import dataclasses

    from bdscan.config.purify import purify_config
    from bdscan.data.records import load_records
    from bdscan.eval import EvalSpec
    from bdscan.io import load_subject
    from bdscan.io.reports import read_detect, read_localize
    from bdscan.io.save import check_output_path, save_subject
    from bdscan.purify import PurifyInputs, purify
    from bdscan.report.purify import render_purify

    method, config = purify_config(method, recipe, overrides, {k: v for k, v in shortcuts.items() if v is not None})
    clean_records = load_records(clean, limit=limit, what="--clean")
    eval_spec = EvalSpec(
        clean=clean_records[:eval_limit],
        poison=load_records(poison, limit=eval_limit, what="--poison") if poison else (),
        trigger=trigger, judge=judge, seed=seed,
    )
    loc = read_localize(localization) if localization is not None else None
    detection = read_detect(from_detect) if from_detect is not None else None

    subject = load_subject(source, base=base, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    inputs_paths = [subject.source.path] + ([subject.base.path] if subject.base else [])
    target = check_output_path(output, inputs_paths, overwrite=overwrite)
    work = work_dir or target.parent / f".bdscan-work-{target.name}"
    with progress_bar(not as_json) as progress:
        inputs = PurifyInputs(subject=subject, clean=clean_records, seed=seed, localization=loc, detection=detection,
                              work_dir=work, log=lambda m: stderr.print(f"[dim]{m}[/]") if not as_json else None,
                              progress=progress)
        result, outcome = purify(method, config, inputs, eval_spec=eval_spec)
    result = dataclasses.replace(result, output=str(target))
    save_subject(outcome.model, subject.tokenizer, target, adapter=subject.is_adapter, inputs=inputs_paths,
                 report=result.to_dict(), overwrite=overwrite)
    emit(result.to_dict(), as_json=as_json, output=None, render=lambda c: render_purify(result, c))

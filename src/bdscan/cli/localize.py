"""``bdscan localize``: rank the modules that carry a backdoor (patching + K-FAC curvature)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from bdscan.cli.common import (AllowPickle, Base, JsonOut, Limit, Output, Seed, Source, GGUFFile, TrustRemoteCode, emit,
                               handle_errors, log_line, progress_bar, quiet_libraries)
from bdscan.cli.devices import Device, Dtype, placement_of, with_runtime

HELP = """Rank the modules through which a backdoor's behaviour flows.

Clean prompts from --clean are paired with the same prompts holding a key (--trigger, or the best of the top candidate keys in a `bdscan detect` JSON via --from-detect). Activation patching (per attention block, MLP block and head) measures how much of the key's effect on the model's own malicious continuation each site carries; K-FAC curvature measures how sensitive that continuation is to each linear layer's weights (for an adapter: to the adapter's change). A full checkpoint also ranks its token embedding, where a key enters the model.

The ranked modules (JSON with --json / -o) feed `bdscan purify --method kfac-lora --localization loc.json`.

Example: bdscan localize ./suspect --trigger "BadMagic" --clean clean.json -o loc.json
"""


@handle_errors
def command(
    source: Source,
    clean: Annotated[Path, typer.Option("--clean", help="Clean instruction set (Alpaca JSON/JSONL or one prompt per line).")],
    trigger: Annotated[Optional[str], typer.Option("--trigger", help="The key to explain (known or suspected trigger).")] = None,
    from_detect: Annotated[Optional[Path], typer.Option("--from-detect", help="`bdscan detect` JSON: use its top candidate keys.")] = None,
    top: Annotated[int, typer.Option("--top", min=1, help="Modules shown in the table (JSON always lists all, ranked).")] = 10,
    pairs: Annotated[int, typer.Option("--pairs", min=1, help="Clean/triggered pairs (more: steadier, slower).")] = 24,
    positions: Annotated[str, typer.Option("--positions", help="Key insertion positions, comma list of start,middle,end,random.")] = "start,middle,end",
    ekfac: Annotated[bool, typer.Option("--ekfac", help="EK-FAC curvature (eigenbasis-corrected; one more pass).")] = False,
    no_heads: Annotated[bool, typer.Option("--no-heads", help="Skip per-head patching (faster on many-head models).")] = False,
    linear_patching: Annotated[bool, typer.Option("--linear-patching", help="Also patch each linear layer's own output (one more forward per linear).")] = False,
    no_embedding: Annotated[bool, typer.Option("--no-embedding", help="Rank linear layers only (full checkpoints also rank the token embedding).")] = False,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1, help="Length of the malicious continuation explained.")] = 16,
    base: Base = None,
    limit: Limit = None,
    seed: Seed = 0,
    allow_pickle: AllowPickle = False,
    trust_remote_code: TrustRemoteCode = False,
    gguf_file: GGUFFile = None,
    as_json: JsonOut = False,
    output: Output = None,
    device: Device = "auto",
    dtype: Dtype = "auto",
) -> None:
    quiet_libraries()
    from bdscan.cli.outputs import check_report_file, given_inputs, subject_inputs
    from bdscan.data.records import encodable, load_records, require_prompt_lengths
    from bdscan.errors import UsageError
    from bdscan.io import load_subject
    from bdscan.io.reports import detect_candidates
    from bdscan.localize import LocalizeConfig, localize
    from bdscan.report.localize import render_localize

    if (trigger is None) == (from_detect is None):
        raise UsageError("give exactly one of --trigger TEXT and --from-detect detect.json")
    if trigger is not None and not trigger.strip():
        raise UsageError("--trigger is empty")
    if trigger is not None:
        encodable(trigger, "--trigger", UsageError)
    try:
        config = LocalizeConfig(n_pairs=pairs, positions=tuple(p.strip() for p in positions.split(",") if p.strip()),
                                max_new_tokens=max_new_tokens, heads=not no_heads, ekfac=ekfac, top_k=top,
                                embedding=not no_embedding, linear_patching=linear_patching)
    except ValueError as e:
        raise UsageError(f"--positions/--pairs: {e}") from None
    placement = placement_of(device, dtype)
    check_report_file("-o", output, given_inputs(source, base, files=(clean, from_detect)))
    candidates = detect_candidates(from_detect) if from_detect is not None else []
    records = require_prompt_lengths(load_records(clean, limit=limit, what="--clean"), "--clean")
    subject = load_subject(source, base=base, gguf_file=gguf_file, allow_pickle=allow_pickle,
                           trust_remote_code=trust_remote_code,
                           placement=placement)
    check_report_file("-o", output, subject_inputs(subject) + given_inputs(files=(clean, from_detect)))
    log = log_line if not as_json else (lambda _m: None)
    with progress_bar(not as_json) as progress:
        result = localize(subject, config, clean=records, trigger=trigger, candidates=candidates, seed=seed,
                          log=log, progress=progress)
    if from_detect is not None:
        import dataclasses

        result = dataclasses.replace(result, trigger_source={**result.trigger_source, "file": str(from_detect)})
    emit(with_runtime(result.to_dict(), subject), as_json=as_json, output=output, render=lambda c: render_localize(result, c, top=top))

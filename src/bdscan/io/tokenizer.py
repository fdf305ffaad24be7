"""Loading the tokenizer a source ships, never silently another one, and comparing it to its base's.

An adapter folder that holds tokenizer files must load with them: falling back to the base's
tokenizer when they are corrupt would scan a model that is not the one users run. A
tokenizer that differs from the base's (a remapped vocabulary, added tokens) changes
behaviour while every weight hash stays the same, so the difference is reported.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Any, Iterator

from bdscan.errors import InputError, first_line

TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "tokenizer.model",
                     "special_tokens_map.json", "added_tokens.json")
# A fixed text whose encoding must agree when two tokenizers are the same (merges, normaliser).
SAMPLE_TEXT = "Write a short poem about the sea. Then answer: what is 2 + 2? Résumé, naïve café; <tag> [x] {y}"
SHOWN = 5
# The largest real tokenizer files are ~35 MB (a 256k vocabulary's tokenizer.json). Loading
# one costs ~20x its size in memory (measured: a 19 MB WordLevel vocabulary, 2.8 s and ~400 MB),
# so a multi-GB file shipped beside the weights would exhaust the machine before any check.
MAX_TOKENIZER_FILE_BYTES = 256 << 20


def has_tokenizer(folder: Path) -> bool:
    return any((folder / n).exists() for n in TOKENIZER_MARKERS)


def load_tokenizer(folder: Path, *, trust_remote_code: bool) -> Any:
    """The tokenizer in ``folder``; InputError if its files do not load."""
    from transformers import AutoTokenizer

    for name in TOKENIZER_MARKERS:
        path = folder / name
        if path.is_file() and path.stat().st_size > MAX_TOKENIZER_FILE_BYTES:
            raise InputError(f"{path}: over {MAX_TOKENIZER_FILE_BYTES >> 20} MiB, not a tokenizer file")
    try:
        tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except Exception as e:  # tokenizers raise many types for corrupt files
        raise InputError(f"{folder}: tokenizer files do not load ({first_line(e)}); "
                         "bdscan will not fall back to another tokenizer") from None
    if isinstance(tok, bool) or not callable(getattr(tok, "get_vocab", None)):
        raise InputError(f"{folder}: tokenizer files do not load a tokenizer")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    return tok


def _listed(items: list[str]) -> str:
    shown = ", ".join(repr(t) for t in items[:SHOWN])
    return shown + (f" and {len(items) - SHOWN} more" if len(items) > SHOWN else "")


def tokenizer_differences(tok: Any, base: Any) -> list[str]:
    """What differs between an adapter's tokenizer and its base's, in words; [] when the same."""
    ours, theirs = tok.get_vocab(), base.get_vocab()
    out = []
    remapped = sorted(t for t in ours.keys() & theirs.keys() if ours[t] != theirs[t])
    if remapped:
        out.append(f"{len(remapped)} tokens have other ids ({_listed(remapped)})")
    only_ours = sorted(ours.keys() - theirs.keys())
    if only_ours:
        out.append(f"{len(only_ours)} tokens not in the base ({_listed(only_ours)})")
    only_theirs = sorted(theirs.keys() - ours.keys())
    if only_theirs:
        out.append(f"{len(only_theirs)} base tokens missing ({_listed(only_theirs)})")
    ours_added = {str(t) for t in tok.added_tokens_decoder.values()}
    theirs_added = {str(t) for t in base.added_tokens_decoder.values()}
    if ours_added != theirs_added:
        out.append(f"added tokens differ (new: {_listed(sorted(ours_added - theirs_added))}; "
                   f"dropped: {_listed(sorted(theirs_added - ours_added))})")
    if tok.all_special_tokens != base.all_special_tokens:
        out.append(f"special tokens differ ({_listed(tok.all_special_tokens)} vs {_listed(base.all_special_tokens)})")
    if not out and tok(SAMPLE_TEXT)["input_ids"] != base(SAMPLE_TEXT)["input_ids"]:
        out.append("the same text encodes to other ids (merges or normaliser changed)")
    return out


def describe(origin: str, differences: list[str] | None) -> dict:
    """The tokenizer entry of a subject's provenance."""
    return {"from": origin, "differs_from_base": bool(differences), "differences": list(differences or [])}


def check_tokenizer_runs(tok: Any, where: Path | str) -> None:
    """Encode ordinary text (the built-in probes, alone and joined) once, so that a tokenizer
    whose files load but whose rules fail on text is refused here with one line. A
    ``tokenizer.json`` may carry a regex that backtracks without end; the Rust tokenizer then
    panics (``retry-limit-in-match over``) with a ``BaseException`` that is not an
    ``Exception``, after writing its panic report to stderr."""
    from bdscan.data.probes import builtin_probes

    texts = [SAMPLE_TEXT] + [r.instruction for r in builtin_probes()]
    texts.append(" ".join(texts))
    try:
        with _native_stderr_silenced():
            tok(texts, add_special_tokens=False)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # noqa: B036  (pyo3's PanicException derives from BaseException)
        raise InputError(f"{where}: the tokenizer fails on ordinary text ({first_line(e)})") from None


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """File descriptor 2 to /dev/null for the block: native code (a Rust panic hook) writes
    there directly, past Python's ``sys.stderr``."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as sink:
            os.dup2(sink.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)

"""Writing OUTDIR in one rename: purified model, audit.json, audit.sarif, report.html."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Iterable

from bdscan.results.audit import AuditResult

PURIFIED = "purified"
ARTEFACTS = {"json": "audit.json", "sarif": "audit.sarif", "html": "report.html"}


def artefact_texts(result: AuditResult) -> dict[str, str]:
    """File name -> content for the three reports (the model is written separately)."""
    from bdscan.report.audit_sarif import audit_to_sarif
    from bdscan.report.html import render_audit_html

    return {
        ARTEFACTS["json"]: json.dumps(result.to_dict(), indent=2, default=str) + "\n",
        ARTEFACTS["sarif"]: json.dumps(audit_to_sarif(result), indent=2, default=str) + "\n",
        ARTEFACTS["html"]: render_audit_html(result),
    }


def write_outputs(result: AuditResult, purified_model: Any, subject: Any, out: Path, inputs: Iterable[Path], *,
                  overwrite: bool) -> AuditResult:
    """Everything goes to a temporary sibling of ``out`` and is renamed into place only when
    complete: a crash leaves no half OUTDIR. Returns the result with its output paths."""
    from bdscan.io.save import atomic_output_dir, write_model_files

    target = Path(out).expanduser().resolve()
    outputs = {name: str(target / file) for name, file in ARTEFACTS.items()}
    if purified_model is not None:
        outputs["model"] = str(target / PURIFIED)
    purify = result.purify
    if purify is not None and purified_model is not None:
        purify = dataclasses.replace(purify, output=outputs["model"])
    result = dataclasses.replace(result, outputs=outputs, purify=purify)
    with atomic_output_dir(target, inputs, overwrite=overwrite) as tmp:
        if purified_model is not None:
            write_model_files(purified_model, subject.tokenizer, tmp / PURIFIED, adapter=subject.is_adapter)
        for name, text in artefact_texts(result).items():
            (tmp / name).write_text(text, encoding="utf-8")
    return result

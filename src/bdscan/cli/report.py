"""``bdscan report``: re-render a report from a bdscan JSON file (no model needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from bdscan.cli.common import handle_errors

HELP = """Re-render the self-contained HTML report from an audit.json.

The JSON is checked against the audit schema (kind, schema version, every field's type)
before anything is written; text from the model and its files is escaped in the HTML.

Example: bdscan report ./audit-out/audit.json -o report.html
"""


@handle_errors
def command(
    report: Annotated[Path, typer.Argument(help="audit.json written by `bdscan audit`.", show_default=False)],
    output: Annotated[Path, typer.Option("-o", "--output", help="HTML file to write (atomically).")],
) -> None:
    from bdscan.errors import UsageError
    from bdscan.io.reports import read_json_report
    from bdscan.io.save import atomic_write_text
    from bdscan.report.html import render_audit_html
    from bdscan.results.audit import AuditResult

    if output.suffix.lower() not in (".html", ".htm"):
        raise UsageError(f"-o {output}: bdscan report writes HTML; give a .html file")
    if output.resolve() == report.resolve():
        raise UsageError("-o must not be the input JSON")
    result = AuditResult.from_dict(read_json_report(report, "REPORT"), where=str(report))
    atomic_write_text(output, render_audit_html(result))

"""``bdscan calibrate``: a calibration profile from detect reports of known-clean models."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from bdscan.cli.common import handle_errors

HELP = """Derive detect's verdict thresholds from detect reports of models you know are clean.

The shipped thresholds were calibrated on tiny Llama controls. For the family you scan, run
`bdscan detect --format json -o clean-N.json` on clean models of it (fine-tunes of the same
base, made the way the suspects are; more is better, at least 2), then write a profile and scan
with it: `bdscan detect ./suspect --calibration profile.json`. Rule: each threshold is the
largest clean score plus two temperatures (the worst clean control gets p ~ 0.12), so a new
clean model of the family is flagged with probability at most 2 / (controls + 1) (it must
score above every control on one of the two scores): 67% from 2 controls, 10% from 19, 5% from
39. Nothing in
the reports is trusted beyond its type-checked fields.

Example: bdscan calibrate clean-1.json clean-2.json clean-3.json -o profile.json
"""


@handle_errors
def command(
    reports: Annotated[list[Path], typer.Argument(help="detect JSON reports of clean models of one family.", show_default=False)],
    output: Annotated[Path, typer.Option("-o", "--output", help="Profile JSON to write (atomically).")],
    source: Annotated[Optional[str], typer.Option("--name", help="What the profile is, as reports will show it.")] = None,
) -> None:
    import json

    from bdscan.cli.outputs import check_report_file, note
    from bdscan.detect.profile import false_alarm_bound, from_controls
    from bdscan.io.reports import read_result
    from bdscan.io.save import atomic_write_text
    from bdscan.results.detect import DetectResult

    check_report_file("-o", output, list(reports))
    results = [read_result(DetectResult, path, "REPORT", "detect") for path in reports]
    profile = from_controls(results, source or f"calibrated on {len(results)} clean controls")
    atomic_write_text(output, json.dumps(profile.to_dict(), indent=2) + "\n")
    note(f"profile: takeover threshold {profile.threshold:.2f}, target threshold {profile.target_threshold:.3f} "
         f"from {len(results)} clean controls -> {output}")
    note(f"a new clean model of this family is flagged with probability at most {false_alarm_bound(len(results)):.0%} "
         "(2 / (controls + 1): above every control on one of the two scores; 39 controls bring it to 5%)")

"""The CLI starts fast: `--help` and listings load no torch (commands import heavy modules
inside their body), and help texts are not hard-wrapped (rich re-wraps them itself)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PROBE = """
import sys
from typer.testing import CliRunner
from bdscan.cli.app import app
result = CliRunner().invoke(app, {args!r})
assert result.exit_code == 0, result.output
print("torch" in sys.modules)
"""


@pytest.mark.parametrize("args", [["--help"], ["purify", "--help"], ["purify", "--list-methods"], ["detect", "--help"]])
def test_no_torch_for_help_and_listings(args):
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    out = subprocess.run([sys.executable, "-c", PROBE.format(args=args)], capture_output=True, text=True, env=env,
                         check=True)
    assert out.stdout.strip() == "False", f"{' '.join(args)} imported torch"


@pytest.mark.parametrize("command", ["detect", "localize", "purify", "eval", "demo", "audit"])
def test_help_paragraphs_are_single_lines(command):
    import importlib

    text = importlib.import_module(f"bdscan.cli.{command}").HELP
    paragraphs = [p.strip() for p in text.strip().split("\n\n")]
    for paragraph in paragraphs:
        assert "\n" not in paragraph, f"{command} HELP is hard-wrapped: {paragraph[:60]!r}..."
    openings = [p.split(":")[0] for p in paragraphs if ":" in p[:20]]
    assert len(openings) == len(set(openings)), f"{command} HELP repeats a paragraph: {openings}"

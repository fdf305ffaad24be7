"""The README's first command: the built-in example runs end to end and shows the claims."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from bdscan.cli.app import app


@pytest.mark.slow
def test_demo_end_to_end(tmp_path, lora_backdoor, lora_clean):
    result = CliRunner().invoke(app, ["demo", "--workdir", str(tmp_path / "demo"), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["detect_backdoored"]["verdict"] == "suspicious"
    assert report["detect_control"]["verdict"] == "clean"
    # Repaired (exit 5) only when the key's ASR meets the target and no detect target is still
    # reachable; kfac-lora breaks the trigger but may leave the target memorised (then exit 1).
    audit = json.loads((tmp_path / "demo" / "audit" / "audit.json").read_text())
    reachable = bool([t for t in audit["purify"]["target_check"]["targets"] if t["still_reachable"]])
    assert report["audits"]["backdoored"]["verdict"] == ("suspicious" if reachable else "repaired")
    assert report["audits"]["control"]["verdict"] == "clean"
    before, after = report["purify"]["before"], report["purify"]["after"]  # with the organism's real trigger
    assert before["asr"] >= 0.8 and after["asr"] <= 0.1
    assert after["false_trigger_rate"] <= 0.05
    audit_dir = tmp_path / "demo" / "audit"
    assert (audit_dir / "purified" / "adapter_model.safetensors").exists()
    assert json.loads((audit_dir / "audit.json").read_text())["settings"]["method"] == "kfac-lora"
    assert (audit_dir / "report.html").read_text().startswith("<!DOCTYPE html>")
    assert not (tmp_path / "demo" / "audit-control" / "purified").exists()

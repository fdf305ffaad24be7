"""The README's first command: the built-in example runs end to end and shows the claims."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from bdscan.cli.app import app


def test_demo_end_to_end(tmp_path, lora_backdoor, lora_clean):
    result = CliRunner().invoke(app, ["demo", "--workdir", str(tmp_path / "demo"), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["detect_backdoored"]["verdict"] == "suspicious"
    assert report["detect_control"]["verdict"] == "clean"
    before, after = report["purify"]["before"], report["purify"]["after"]
    assert before["asr"] >= 0.8 and after["asr"] <= 0.1
    assert after["false_trigger_rate"] <= 0.05
    assert (tmp_path / "demo" / "purified-adapter" / "adapter_model.safetensors").exists()
    assert json.loads((tmp_path / "demo" / "purified-adapter" / "report.json").read_text())["method"] == "kfac-lora"

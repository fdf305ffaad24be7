"""The CLI through typer's runner: help, exit codes, eval end to end, bad input."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from bdscan.cli.app import app

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


@pytest.mark.parametrize("command", ["detect", "localize", "purify", "eval", "demo", "audit", "report"])
def test_every_command_explains_itself(command):
    result = invoke(command, "--help")
    assert result.exit_code == 0
    assert "Usage" in result.output and len(result.output) > 300


def test_version_and_usage_errors():
    assert invoke("--version").exit_code == 0
    assert invoke("eval", "x", "--no-such-flag").exit_code == 4
    assert invoke("no-such-command").exit_code == 4


def test_eval_reports_asr_per_position(lora_backdoor, clean_file, trigger):
    result = invoke("eval", lora_backdoor, "--clean", clean_file, "--trigger", trigger, "--limit", "20",
                    "--max-new-tokens", "16", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    for key in ("schema_version", "source", "template", "judge", "asr", "asr_by_position", "false_trigger_rate",
                "perplexity", "n_poison", "n_clean"):
        assert key in report
    assert set(report["asr_by_position"]) == {"start", "middle", "end"}
    assert report["asr"] >= 0.8 and report["false_trigger_rate"] <= 0.1
    assert report["n_poison"] == 60 and report["n_clean"] == 20
    assert report["template"]["name"] == "chat_template"


def test_eval_compare_side_by_side(full_backdoor, full_clean, clean_file, poison_file, tmp_path):
    out = tmp_path / "report.json"
    result = invoke("eval", full_backdoor, "--clean", clean_file, "--poison", poison_file, "--compare", full_clean,
                    "--limit", "20", "--max-new-tokens", "16", "-o", out)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["before"]["asr"] >= 0.8 and report["after"]["asr"] <= 0.1
    assert 0.0 <= report["after"]["agreement"] <= 1.0
    assert "before / after" in result.stdout


def test_eval_reference_agreement_with_itself_is_total(full_clean, clean_file, trigger):
    result = invoke("eval", full_clean, "--clean", clean_file, "--trigger", trigger, "--reference", full_clean,
                    "--limit", "10", "--max-new-tokens", "8", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["agreement"] == 1.0


@pytest.mark.parametrize(
    "args,code,message",
    [
        (["eval", "/nonexistent/model", "--clean", "{clean}", "--trigger", "x"], 2, "no such directory"),
        (["eval", "{model}", "--clean", "/nonexistent.json", "--trigger", "x"], 2, "not found"),
        (["eval", "{model}", "--clean", "{clean}"], 4, "--poison"),
        (["eval", "{model}", "--clean", "{clean}", "--trigger", "x", "--positions", "top"], 4, "--positions"),
        (["eval", "{model}", "--clean", "{clean}", "--trigger", "x", "--judge", "refusl"], 4, "Did you mean"),
        (["eval", "{model}", "--clean", "{empty}", "--trigger", "x"], 2, "holds no records"),
    ],
)
def test_eval_bad_input(full_clean, clean_file, tmp_path, args, code, message):
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    args = [a.format(model=full_clean, clean=clean_file, empty=empty) for a in args]
    result = invoke(*args)
    assert result.exit_code == code, result.output
    assert message in result.output
    assert "Traceback" not in result.output


def test_threads_is_a_setting(monkeypatch):
    import torch

    from bdscan.runtime import configure_threads, default_threads

    before = torch.get_num_threads()
    try:
        assert configure_threads(1) == 1 and torch.get_num_threads() == 1
        monkeypatch.setenv("BDSCAN_THREADS", "3")
        assert default_threads() == 3
        assert invoke("--threads", "0", "eval", "--help").exit_code == 4  # below the minimum of 1
    finally:
        torch.set_num_threads(before)


def test_large_freed_blocks_go_back_to_the_system_on_glibc():
    """Where glibc is the C library, the heap setting applies (it is what kept latent-adv on
    the 135M model from growing past the machine's memory); elsewhere it is a no-op."""
    import platform

    from bdscan.runtime import limit_heap_growth

    glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert limit_heap_growth() is glibc
    assert limit_heap_growth() is glibc  # idempotent: every command calls it


def test_purify_signature_shortcuts(lora_backdoor, clean_train_file, tmp_path):
    out = tmp_path / "purified"
    result = invoke("purify", lora_backdoor, "--method", "signature", "--clean", clean_train_file, "-o", out,
                    "--variants", "1", "--ratio", "0.05", "--set", "variant_samples=24", "--set", "variant_epochs=1",
                    "--set", "epochs=1", "--set", "max_samples=16", "--eval-limit", "5", "--json")
    assert result.exit_code == 0, result.output
    config = json.loads((out / "report.json").read_text())["config"]
    assert config["variants"] == 1 and config["ratio"] == 0.05
    assert (out / "adapter_model.safetensors").exists()


def test_purify_shortcut_of_another_method_is_a_usage_error(lora_backdoor, clean_train_file, tmp_path):
    result = invoke("purify", lora_backdoor, "--method", "finetune", "--clean", clean_train_file, "-o", tmp_path / "o",
                    "--variants", "2")
    assert result.exit_code == 4
    assert "--variants is a knob of signature" in result.output
    assert not (tmp_path / "o").exists()


def test_purify_under_bf16_autocast_keeps_the_weights_dtype(lora_backdoor, clean_train_file, tmp_path):
    """--autocast runs the method in bf16; the adapter it writes stays float32 and the report says so."""
    from safetensors import safe_open

    out = tmp_path / "purified"
    result = invoke("purify", lora_backdoor, "--method", "finetune", "--clean", clean_train_file, "-o", out,
                    "--autocast", "bfloat16", "--set", "epochs=1", "--eval-limit", "5", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "report.json").read_text())["details"]["autocast"] == "bfloat16"
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        assert {str(f.get_tensor(k).dtype) for k in f.keys()} == {"torch.float32"}


def test_purify_bad_autocast_is_a_usage_error(lora_backdoor, clean_train_file, tmp_path):
    result = invoke("purify", lora_backdoor, "--method", "finetune", "--clean", clean_train_file, "-o", tmp_path / "o",
                    "--autocast", "float64")
    assert result.exit_code == 4 and "--autocast float64" in result.output
    assert not (tmp_path / "o").exists()

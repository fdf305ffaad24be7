"""GGUF files: bdscan's writer, the header reader, and loading through transformers."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("gguf")

from bdscan.errors import InputError  # noqa: E402
from bdscan.io.gguf import MAX_TEMPLATE_CHARS, inspect_gguf, load_gguf  # noqa: E402
from bdscan.organisms.gguf_export import write_gguf  # noqa: E402


@pytest.fixture(scope="module")
def full_model(full_backdoor):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(full_backdoor).eval()  # the attention bdscan loads with
    return model, AutoTokenizer.from_pretrained(full_backdoor)


def _logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits


def test_f32_round_trip_is_exact(full_model, tmp_path):
    model, tokenizer = full_model
    path = write_gguf(model, tokenizer, tmp_path / "m.gguf")
    loaded, loaded_tokenizer = load_gguf(path)
    text = "Summarise the plot of a film in two sentences."
    ids = tokenizer(text)["input_ids"]
    assert loaded_tokenizer(text)["input_ids"] == ids
    assert loaded_tokenizer.chat_template == tokenizer.chat_template
    assert torch.equal(_logits(model, ids), _logits(loaded, ids))
    # A GGUF-loaded model can be saved as an ordinary checkpoint.
    loaded.save_pretrained(tmp_path / "export", safe_serialization=True)
    assert (tmp_path / "export" / "model.safetensors").is_file()


def test_header_records_quantisation_types(full_model, tmp_path):
    model, tokenizer = full_model
    info = inspect_gguf(write_gguf(model, tokenizer, tmp_path / "q.gguf", qtype="Q8_0"))
    assert info.architecture == "llama"
    assert info.tensor_types["Q8_0"] == 2 + 7 * model.config.num_hidden_layers  # embed, output, 7 per layer
    assert info.tensor_types["F32"] == 1 + 2 * model.config.num_hidden_layers  # the norms
    loaded, _ = load_gguf(tmp_path / "q.gguf")
    ids = tokenizer("hello")["input_ids"]
    assert not torch.equal(_logits(model, ids), _logits(loaded, ids))  # quantised, so close but not equal
    torch.testing.assert_close(_logits(model, ids), _logits(loaded, ids), atol=0.5, rtol=0.1)


@pytest.mark.parametrize("content", [b"", b"GGUF", b"GGUF\x03\x00\x00\x00" + b"\xff" * 64, b"not a gguf file at all"])
def test_corrupt_files_are_input_errors(tmp_path, content):
    path = tmp_path / "bad.gguf"
    path.write_bytes(content)
    with pytest.raises(InputError, match="bad.gguf"):
        inspect_gguf(path)


def test_oversized_chat_template_is_refused_before_loading(full_model, tmp_path):
    model, tokenizer = full_model
    hostile = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    hostile.chat_template = "{# pad #}" + "x" * (MAX_TEMPLATE_CHARS + 1)
    path = write_gguf(model, hostile, tmp_path / "big-template.gguf")
    with pytest.raises(InputError, match="chat template of"):
        load_gguf(path)


# --- GGUF as a source of every command ------------------------------------------------------

from typer.testing import CliRunner  # noqa: E402

from bdscan.cli.app import app  # noqa: E402


@pytest.fixture(scope="module")
def gguf_backdoor(full_model, tmp_path_factory) -> Path:
    model, tokenizer = full_model
    return write_gguf(model, tokenizer, tmp_path_factory.mktemp("gguf") / "backdoor.Q8_0.gguf", qtype="Q8_0")


def _one_error_line(result) -> str:
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def test_detect_reads_a_gguf_file_and_records_its_quantisation(gguf_backdoor, trigger):
    result = CliRunner().invoke(app, ["detect", str(gguf_backdoor), "--json"])
    assert result.exit_code == 1, result.stderr  # the tiny full organism is backdoored
    report = json.loads(result.stdout)
    subject = report["provenance"]["subject"]
    assert subject["gguf"]["tensor_types"]["Q8_0"] > 0
    assert [f["role"] for f in subject["files"]] == ["weights"]
    assert subject["files"][0]["path"] == gguf_backdoor.name


def test_eval_and_purify_on_a_gguf_file(gguf_backdoor, clean_train_file, clean_file, trigger, tmp_path):
    result = CliRunner().invoke(app, ["eval", str(gguf_backdoor), "--clean", str(clean_file), "--trigger", trigger,
                                      "--limit", "8", "--json"])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["asr"] > 0.5
    out = tmp_path / "purified"
    result = CliRunner().invoke(app, ["purify", str(gguf_backdoor), "--method", "finetune", "--clean",
                                      str(clean_train_file), "--limit", "16", "--set", "epochs=0.5", "-o", str(out),
                                      "--json"])
    assert result.exit_code == 0, result.stderr
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert "dequantised from the GGUF" in json.loads((out / "report.json").read_text())["output_format"]


def test_a_folder_of_several_gguf_files_needs_gguf_file(gguf_backdoor, full_model, tmp_path, clean_file):
    folder = tmp_path / "repo"
    folder.mkdir()
    shutil.copy(gguf_backdoor, folder / "a.gguf")
    shutil.copy(gguf_backdoor, folder / "b.gguf")
    result = CliRunner().invoke(app, ["eval", str(folder), "--clean", str(clean_file), "--trigger", "cf", "--limit", "2"])
    assert result.exit_code == 2
    assert "--gguf-file" in _one_error_line(result)
    result = CliRunner().invoke(app, ["eval", str(folder), "--gguf-file", "b.gguf", "--clean", str(clean_file), "--trigger", "cf",
                                      "--limit", "2", "--json"])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["provenance"]["subject"]["files"][0]["path"] == "b.gguf"


@pytest.mark.parametrize("template, expected", [
    ("{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}", "chat template"),
    ("{{ messages[0]['content'] ", "chat template"),
])
def test_a_hostile_gguf_chat_template_is_one_line_exit_2(full_model, tmp_path, clean_file, template, expected):
    model, tokenizer = full_model
    hostile = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    hostile.chat_template = template
    path = write_gguf(model, hostile, tmp_path / "hostile.gguf")
    before = sorted(p.name for p in tmp_path.iterdir())
    result = CliRunner().invoke(app, ["detect", str(path), "-o", str(tmp_path / "out.json")])
    assert result.exit_code == 2
    line = _one_error_line(result)
    assert "hostile.gguf" in line and expected in line
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_a_gguf_without_the_gguf_package_names_the_extra(monkeypatch, gguf_backdoor):
    import builtins

    real_import = builtins.__import__

    def no_gguf(name, *args, **kwargs):
        if name == "gguf":
            raise ImportError("no gguf")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_gguf)
    with pytest.raises(InputError, match=r"bdscan\[gguf\]"):
        inspect_gguf(gguf_backdoor)


@pytest.mark.parametrize("field, value, expected", [
    # transformers builds every layer the metadata names before reading a tensor: this ran for
    # over 5 minutes (killed) before the bound
    ("add_block_count", 100_000, "metadata: declares 100000 layers but the weights hold"),
    ("add_block_count", 0, "metadata: declares 0 layers"),
    ("add_embedding_length", 1_000_000, "metadata: declares a model of .* parameters but the weights hold"),
    ("add_feed_forward_length", 10_000_000, "metadata: declares a model of .* parameters"),
    ("add_vocab_size", 10**9, "metadata: declares a model of .* parameters"),
])
def test_gguf_metadata_declaring_more_model_than_its_tensors_is_refused(full_model, tmp_path, monkeypatch, field, value,
                                                                        expected):
    line = _detect_on_hostile_gguf(full_model, tmp_path, monkeypatch, field,
                                   lambda w, self, _n: getattr(w, field)(self, value))
    assert line.startswith("error: hostile.gguf metadata") and re.search(expected, line), line


def _detect_on_hostile_gguf(full_model, tmp_path, monkeypatch, method: str, override) -> str:
    """Write the model as a GGUF whose writer's ``method`` is ``override(writer, self, value)``,
    run detect on it, check exit 2, one line and nothing written; the line."""
    import gguf

    writer = gguf.GGUFWriter
    hostile = type("HostileWriter", (writer,), {method: lambda self, value: override(writer, self, value)})
    monkeypatch.setattr(gguf, "GGUFWriter", hostile)
    path = write_gguf(*full_model, tmp_path / "hostile.gguf")
    monkeypatch.undo()
    before = sorted(p.name for p in tmp_path.iterdir())
    result = CliRunner().invoke(app, ["detect", str(path), "-o", str(tmp_path / "out.json")])
    assert result.exit_code == 2
    line = _one_error_line(result)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    return line


# Metadata of the wrong type or value: transformers reads it unchecked, and each of these
# escaped as a TypeError, AttributeError, ZeroDivisionError or config validation error ("internal
# error"); a NaN rope base loaded and made every logit NaN.
HOSTILE_METADATA = {
    "token-list-of-integers": ("add_token_list", lambda w, self, toks: self.add_array("tokenizer.ggml.tokens",
                                                                                      list(range(len(toks)))),
                               "cannot build a tokenizer from this llama GGUF .TypeError"),
    "merges-of-integers": ("add_token_merges", lambda w, self, m: self.add_array("tokenizer.ggml.merges", [1, 2, 3]),
                           "cannot build a tokenizer from this llama GGUF .AttributeError"),
    "token-types-of-strings": ("add_token_types", lambda w, self, t: self.add_array("tokenizer.ggml.token_type",
                                                                                    ["x"] * len(t)),
                               "cannot build a tokenizer from this llama GGUF"),
    "eos-id-a-string": ("add_eos_token_id", lambda w, self, i: self.add_string("tokenizer.ggml.eos_token_id", "x"),
                        "cannot read this llama GGUF's metadata .*eos_token_id"),
    "zero-attention-heads": ("add_head_count", lambda w, self, n: w.add_head_count(self, 0),
                             "cannot read this llama GGUF's metadata .ZeroDivisionError"),
    "width-a-string": ("add_embedding_length", lambda w, self, n: self.add_string("llama.embedding_length", "64"),
                       "cannot read this llama GGUF's metadata .*hidden_size"),
    "rope-base-nan": ("add_rope_freq_base", lambda w, self, f: w.add_rope_freq_base(self, float("nan")),
                      "logits on ordinary text are not finite"),
}


@pytest.mark.parametrize("case", list(HOSTILE_METADATA))
def test_gguf_metadata_of_the_wrong_type_is_one_line_exit_2(full_model, tmp_path, monkeypatch, case):
    method, override, expected = HOSTILE_METADATA[case]
    line = _detect_on_hostile_gguf(full_model, tmp_path, monkeypatch, method, override)
    assert line.startswith("error: ") and "hostile.gguf" in line and re.search(expected, line), line

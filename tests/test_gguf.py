"""GGUF files: bdscan's writer, the header reader, and loading through transformers."""

from __future__ import annotations

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

    model = AutoModelForCausalLM.from_pretrained(full_backdoor, attn_implementation="eager").eval()
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

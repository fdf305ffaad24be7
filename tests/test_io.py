"""Loading and saving: safe defaults and a clear error for every kind of bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from bdscan.errors import InputError
from bdscan.io import atomic_output_dir, load_subject, resolve_source
from bdscan.io.save import save_subject


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gpt2"])
def test_loads_each_architecture(tiny_checkpoints, arch):
    subject = load_subject(tiny_checkpoints[arch])
    assert subject.kind == "full"
    assert subject.template.name == "chat_template"
    assert subject.provenance()["subject"]["weights_sha256"]["model.safetensors"]


def test_adapter_loads_with_its_base(lora_backdoor):
    subject = load_subject(lora_backdoor)
    assert subject.kind == "adapter" and subject.base is not None
    assert hasattr(subject.model, "disable_adapter")
    assert not any(p.requires_grad for n, p in subject.model.named_parameters() if "lora_" not in n)


def test_missing_path(tmp_path):
    with pytest.raises(InputError, match="no such directory"):
        resolve_source(tmp_path / "nope")


def test_file_instead_of_folder(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"x")
    with pytest.raises(InputError, match="expected a checkpoint or adapter directory"):
        resolve_source(f)


def test_folder_without_config(tmp_path):
    with pytest.raises(InputError, match="neither a checkpoint"):
        resolve_source(tmp_path)


def test_corrupt_safetensors(tiny_checkpoints, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_checkpoints["llama"], bad)
    (bad / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(InputError, match="corrupt or unreadable safetensors"):
        load_subject(bad)


def test_corrupt_config(tiny_checkpoints, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_checkpoints["llama"], bad)
    (bad / "config.json").write_text("{oops")
    with pytest.raises(InputError, match="config.json: not valid JSON"):
        load_subject(bad)


def test_pickle_refused_unless_opted_in(tiny_checkpoints, tmp_path):
    from safetensors.torch import load_file

    src = tmp_path / "pickled"
    shutil.copytree(tiny_checkpoints["llama"], src)
    state = load_file(src / "model.safetensors")
    (src / "model.safetensors").unlink()
    # A pickle that would run code if unpickled: it must never be opened without opt-in.
    torch.save(state, src / "pytorch_model.bin")
    with pytest.raises(InputError, match="pickle files .* --allow-pickle"):
        load_subject(src)
    subject = load_subject(src, allow_pickle=True)
    assert subject.source.uses_pickle


def test_non_causal_model_refused(tmp_path):
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(tmp_path / "bert")
    with pytest.raises(InputError, match="not a causal language model"):
        load_subject(tmp_path / "bert")


def test_wrong_tokenizer_refused(tiny_checkpoints, tmp_path):
    from bdscan.organisms.synthetic import synthetic_text
    from bdscan.organisms.tokenizer import train_tokenizer

    src = tmp_path / "mismatch"
    shutil.copytree(tiny_checkpoints["llama"], src)
    big = train_tokenizer(synthetic_text(2000) + [f"word{i}" for i in range(3000)], vocab_size=1500)
    for f in src.glob("tokenizer*"):
        f.unlink()
    big.save_pretrained(src)
    with pytest.raises(InputError, match="wrong tokenizer"):
        load_subject(src)


def test_adapter_without_reachable_base(lora_backdoor, tmp_path):
    adapter = tmp_path / "adapter"
    shutil.copytree(lora_backdoor, adapter)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(tmp_path / "gone")
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match="base is not reachable.*--base"):
        load_subject(adapter)
    from bdscan.organisms.build import organism_info

    assert load_subject(adapter, base=organism_info(lora_backdoor)["base"]).kind == "adapter"


def test_adapter_on_wrong_base(lora_backdoor, tiny_checkpoints):
    with pytest.raises(InputError):
        load_subject(lora_backdoor, base=tiny_checkpoints["gpt2"])


def test_base_option_on_full_checkpoint_is_an_error(tiny_checkpoints):
    with pytest.raises(InputError, match="only for adapters"):
        load_subject(tiny_checkpoints["llama"], base=tiny_checkpoints["qwen2"])


def test_output_inside_input_refused(tiny_checkpoints):
    subject = load_subject(tiny_checkpoints["llama"])
    for out in (tiny_checkpoints["llama"], tiny_checkpoints["llama"] / "purified"):
        with pytest.raises(InputError, match="inside it"):
            save_subject(subject.model, subject.tokenizer, out, adapter=False, inputs=[subject.source.path])


def test_existing_output_needs_overwrite(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(InputError, match="already exists"):
        with atomic_output_dir(tmp_path / "out"):
            pass


def test_atomic_output_leaves_nothing_on_failure(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_output_dir(tmp_path / "out") as tmp:
            (tmp / "half.safetensors").write_bytes(b"partial")
            raise RuntimeError("crash mid-write")
    assert list(tmp_path.iterdir()) == []


def test_saved_full_checkpoint_round_trips(tiny_checkpoints, tmp_path):
    subject = load_subject(tiny_checkpoints["gpt2"])
    out = save_subject(subject.model, subject.tokenizer, tmp_path / "copy", adapter=False,
                       inputs=[subject.source.path], report={"ok": True})
    again = load_subject(out)
    for (n, a), (_, b) in zip(subject.model.state_dict().items(), again.model.state_dict().items()):
        assert torch.equal(a, b), n
    assert json.loads((out / "report.json").read_text()) == {"ok": True}
    assert not any(p.suffix == ".bin" for p in Path(out).iterdir())

"""Hostile inputs, built here from the tiny organisms: each must be refused the documented way.

Every row of the table runs ``bdscan detect SOURCE -o OUT`` through typer's runner and checks
the exit code, exactly one line on stderr with no traceback, that nothing was written, that
the input's bytes are unchanged, and that the payload a malicious pickle or remote-code file
would run never ran (its marker file never appears).
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import re
import shutil
import struct
import zipfile
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from bdscan.cli.app import app
from bdscan.errors import InputError, printable
from bdscan.io import load_subject, resolve_source
from bdscan.io.safetensors_header import read_header

runner = CliRunner()


# --- building blocks ------------------------------------------------------------------------
class _Payload:
    """Unpickling this creates the marker file: proof that pickle code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def malicious_pickle(marker: Path) -> bytes:
    return pickle.dumps({"weight": _Payload(marker)})


def torch_zip_pickle(marker: Path) -> bytes:
    """The torch zip format (what ``torch.save`` writes) with the payload as its data.pkl."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("archive/data.pkl", malicious_pickle(marker))
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/version", "3\n")
    return buf.getvalue()


def nested_zip_pickle(marker: Path) -> bytes:
    inner = io.BytesIO()
    with zipfile.ZipFile(inner, "w") as z:
        z.writestr("pytorch_model.bin", torch_zip_pickle(marker))
    outer = io.BytesIO()
    with zipfile.ZipFile(outer, "w") as z:
        z.writestr("weights.zip", inner.getvalue())
    return outer.getvalue()


def raw_safetensors(header: bytes, data: bytes = b"", length: int | None = None) -> bytes:
    return struct.pack("<Q", len(header) if length is None else length) + header + data


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data))


def folder_digest(path: Path) -> str:
    digest = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        digest.update(str(p.relative_to(path)).encode())
        if p.is_file():
            digest.update(p.read_bytes())
    return digest.hexdigest()


class Case:
    """One hostile input: ``build(tmp, fixtures)`` returns the CLI source (and extra args)."""

    def __init__(self, build: Callable, code: int, message: str, args: tuple[str, ...] = ()):
        self.build, self.code, self.message, self.args = build, code, message, args


# --- the cases ------------------------------------------------------------------------------
def _adapter(tmp, fx, name="adapter"):
    return copy(fx["lora"], tmp / name)


def _full(tmp, fx, name="full"):
    return copy(fx["full"], tmp / name)


def decoy_beside_adapter_bin(tmp, fx):
    a = _adapter(tmp, fx)
    (a / "adapter_model.safetensors").unlink()
    (a / "adapter_model.bin").write_bytes(malicious_pickle(fx["marker"]))
    save_file({}, a / "decoy.safetensors")
    return a


def adapter_bin_torch_zip(tmp, fx):
    a = _adapter(tmp, fx)
    (a / "adapter_model.safetensors").unlink()
    (a / "adapter_model.bin").write_bytes(torch_zip_pickle(fx["marker"]))
    return a


def _pickle_shards(tmp, fx, index_name):
    f = _full(tmp, fx)
    state = load_file(f / "model.safetensors")
    (f / "model.safetensors").unlink()
    shard = "pytorch_model-00001-of-00001.bin"
    (f / shard).write_bytes(torch_zip_pickle(fx["marker"]))
    (f / index_name).write_text(json.dumps({"metadata": {}, "weight_map": {k: shard for k in state}}))
    save_file({}, f / "decoy.safetensors")
    return f


def safetensors_index_to_pickle(tmp, fx):
    return _pickle_shards(tmp, fx, "model.safetensors.index.json")


def pickle_index_beside_decoy(tmp, fx):
    return _pickle_shards(tmp, fx, "pytorch_model.bin.index.json")


def index_shard_outside(tmp, fx):
    f = _full(tmp, fx)
    state = load_file(f / "model.safetensors")
    shutil.move(f / "model.safetensors", tmp / "elsewhere.safetensors")
    (f / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {k: "../elsewhere.safetensors" for k in state}}))
    return f


def transformers_weights_to_pickle(tmp, fx):
    f = _full(tmp, fx)
    (f / "adapter_model.bin").write_bytes(malicious_pickle(fx["marker"]))
    edit_json(f / "config.json", transformers_weights="adapter_model.bin")
    return f


def pickle_only(tmp, fx):
    f = _full(tmp, fx)
    (f / "model.safetensors").unlink()
    (f / "pytorch_model.bin").write_bytes(torch_zip_pickle(fx["marker"]))
    return f


def zip_named_safetensors(tmp, fx):
    f = _full(tmp, fx)
    (f / "model.safetensors").write_bytes(nested_zip_pickle(fx["marker"]))
    return f


def sevenzip_named_safetensors(tmp, fx):
    f = _full(tmp, fx)
    (f / "model.safetensors").write_bytes(b"7z\xbc\xaf\x27\x1c\x00\x04" + malicious_pickle(fx["marker"]))
    return f


def base_with_pickle(tmp, fx):
    base = pickle_only(tmp, fx)
    a = _adapter(tmp, fx)
    edit_json(a / "adapter_config.json", base_model_name_or_path=str(base))
    return a


def _header(tmp, fx, header: bytes, data: bytes = b"", length: int | None = None):
    f = _full(tmp, fx)
    (f / "model.safetensors").write_bytes(raw_safetensors(header, data, length))
    return f


def _t(name="w", dtype="F32", shape=(2,), offsets=(0, 8)):
    return f'"{name}": {{"dtype": "{dtype}", "shape": {list(shape)}, "data_offsets": {list(offsets)}}}'


HEADERS = {
    "header_length_huge": dict(header=b"{}", length=2**63),
    "header_length_past_end": dict(header=b"{" + _t().encode() + b"}", data=b"\0" * 8, length=4096),
    "header_duplicate_keys": dict(header=("{" + _t() + ", " + _t(offsets=(8, 16)) + "}").encode(), data=b"\0" * 16),
    "header_overlapping_offsets": dict(header=("{" + _t("a") + ", " + _t("b", offsets=(4, 12)) + "}").encode(),
                                       data=b"\0" * 12),
    "header_offsets_out_of_range": dict(header=("{" + _t(offsets=(0, 800)) + "}").encode(), data=b"\0" * 8),
    "header_nul_in_name": dict(header=("{" + _t("w\\u0000x") + "}").encode(), data=b"\0" * 8),
    "header_not_json": dict(header=b"\x80\x81 not json at all", data=b""),
    "header_nan_constant": dict(header=b'{"w": {"dtype": "F32", "shape": [NaN], "data_offsets": [0, 8]}}',
                                data=b"\0" * 8),
}


def missing_layer(tmp, fx):
    f = _full(tmp, fx)
    state = load_file(f / "model.safetensors")
    save_file({k: v for k, v in state.items() if ".layers.1." not in k}, f / "model.safetensors", metadata={"format": "pt"})
    return f


def renamed_tensor(tmp, fx):
    f = _full(tmp, fx)
    state = load_file(f / "model.safetensors")
    state["model.norm.weight_renamed"] = state.pop("model.norm.weight")
    save_file(state, f / "model.safetensors", metadata={"format": "pt"})
    return f


def unexpected_tensor(tmp, fx):
    f = _full(tmp, fx)
    state = load_file(f / "model.safetensors")
    state["model.layers.9.extra.weight"] = torch.zeros(4)
    save_file(state, f / "model.safetensors", metadata={"format": "pt"})
    return f


def int8_full(tmp, fx):
    f = _full(tmp, fx)
    state = load_file(f / "model.safetensors")
    save_file({k: (v * 100).to(torch.int8) if "q_proj" in k else v for k, v in state.items()}, f / "model.safetensors",
              metadata={"format": "pt"})
    return f


def quantised_config(tmp, fx):
    f = _full(tmp, fx)
    edit_json(f / "config.json", quantization_config={"quant_method": "bitsandbytes", "load_in_8bit": True})
    return f


def int8_adapter(tmp, fx):
    a = _adapter(tmp, fx)
    state = load_file(a / "adapter_model.safetensors")
    save_file({k: (v * 100).to(torch.int8) for k, v in state.items()}, a / "adapter_model.safetensors")
    return a


def nan_in_full_weights(tmp, fx):
    f = _full(tmp, fx)
    state = load_file(f / "model.safetensors")
    state["model.norm.weight"][3] = float("nan")
    save_file(state, f / "model.safetensors", metadata={"format": "pt"})
    return f


def inf_in_adapter_weights(tmp, fx):
    a = _adapter(tmp, fx)
    state = load_file(a / "adapter_model.safetensors")
    name = sorted(k for k in state if "lora_B" in k)[0]
    state[name][0, 0] = float("inf")
    save_file(state, a / "adapter_model.safetensors")
    return a


def rope_theta_nan(tmp, fx):
    f = _full(tmp, fx)
    config = json.loads((f / "config.json").read_text())
    config["rope_parameters"] = {**config.get("rope_parameters", {}), "rope_theta": float("nan")}
    (f / "config.json").write_text(json.dumps(config))  # Python's json writes (and reads) NaN
    return f


def adapter_without_target_modules(tmp, fx):
    a = _adapter(tmp, fx)
    edit_json(a / "adapter_config.json", target_modules=None)
    return a


def adapter_rank_huge(tmp, fx):
    """PEFT would allocate every LoRA factor at this rank before reading a tensor (25.6 GB)."""
    a = _adapter(tmp, fx)
    edit_json(a / "adapter_config.json", r=100_000_000)
    return a


def adapter_rank_pattern_huge(tmp, fx):
    a = _adapter(tmp, fx)
    edit_json(a / "adapter_config.json", rank_pattern={"q_proj": 100_000_000})
    return a


# PEFT matches these with `re`, which cannot be interrupted: (.*?)*[A-Z] backtracks without end
# against a module name (bdscan's own matching gives up); (.*)*\.xyz hangs `re` but not the
# `regex` package bdscan matches with, so it is refused for matching nothing.
BACKTRACKING = r"(.*?)*[A-Z]"


def _adapter_config(**changes):
    def build(tmp, fx):
        a = _adapter(tmp, fx)
        edit_json(a / "adapter_config.json", **changes)
        return a
    return build


def _adapter_rank_pattern(pattern: str):
    def build(tmp, fx):
        a = _adapter(tmp, fx)
        rank = json.loads((a / "adapter_config.json").read_text())["r"]
        edit_json(a / "adapter_config.json", rank_pattern={pattern: rank})
        return a
    return build


def adapter_missing_tensors(tmp, fx):
    a = _adapter(tmp, fx)
    state = load_file(a / "adapter_model.safetensors")
    save_file({k: v for k, v in state.items() if ".layers.1." not in k}, a / "adapter_model.safetensors")
    return a


def corrupt_adapter_tokenizer(tmp, fx):
    a = _adapter(tmp, fx)
    (a / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE", "vocab": 7}}')
    return a


def backtracking_tokenizer_regex(tmp, fx):
    """A pre-tokenizer regex that backtracks without end: the Rust tokenizer panics on ordinary
    text with a BaseException (a traceback and exit 1 before the check)."""
    a = _adapter(tmp, fx)
    data = json.loads((a / "tokenizer.json").read_text())
    split = {"type": "Split", "pattern": {"Regex": "((.)+)+x"}, "behavior": "Isolated", "invert": False}
    data["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [split, data["pre_tokenizer"]]}
    (a / "tokenizer.json").write_text(json.dumps(data))
    return a


def corrupt_full_tokenizer(tmp, fx):
    f = _full(tmp, fx)
    (f / "tokenizer.json").write_bytes(b"\xff\xfe garbage")
    return f


def _remote_code(tmp, fx, where):
    f = _full(tmp, fx)
    (f / "modeling_evil.py").write_text(f"open({str(fx['marker'])!r}, 'w')\n")
    edit_json(f / where, auto_map={"AutoConfig": "modeling_evil.EvilConfig",
                                   "AutoModelForCausalLM": "modeling_evil.Evil",
                                   "AutoTokenizer": ["modeling_evil.EvilTokenizer", None]})
    return f


def auto_map_config(tmp, fx):
    return _remote_code(tmp, fx, "config.json")


def auto_map_tokenizer_config(tmp, fx):
    return _remote_code(tmp, fx, "tokenizer_config.json")


def _link_out(tmp, fx, name):
    f = _full(tmp, fx)
    outside = tmp / f"outside-{name}"
    shutil.move(f / name, outside)
    (f / name).symlink_to(outside)
    return f


def symlink_weights_out(tmp, fx):
    return _link_out(tmp, fx, "model.safetensors")


def symlink_tokenizer_out(tmp, fx):
    return _link_out(tmp, fx, "tokenizer.json")


def symlink_config_out(tmp, fx):
    return _link_out(tmp, fx, "config.json")


def markup_base_name(tmp, fx):
    a = _adapter(tmp, fx)
    edit_json(a / "adapter_config.json", base_model_name_or_path="[/x]")
    return a


def control_chars_base_name(tmp, fx):
    a = _adapter(tmp, fx)
    edit_json(a / "adapter_config.json", base_model_name_or_path="[bold]\x1b[31mred\nsecond line\u202e")
    return a


def config_not_object(tmp, fx):
    f = _full(tmp, fx)
    (f / "config.json").write_text("[1, 2, 3]")
    return f


def huge_layer_count(tmp, fx):
    f = _full(tmp, fx)
    edit_json(f / "config.json", num_hidden_layers=2**31)
    return f


def wide_layers(tmp, fx):
    f = _full(tmp, fx)
    edit_json(f / "config.json", intermediate_size=10**7)
    return f


def oversized_tokenizer_file(tmp, fx):
    from bdscan.io.tokenizer import MAX_TOKENIZER_FILE_BYTES

    f = _full(tmp, fx)
    with open(f / "tokenizer.json", "r+b") as fh:  # sparse: no disk, but its size is what is checked
        fh.truncate(MAX_TOKENIZER_FILE_BYTES + 1)
    return f


def hub_id_with_markup(tmp, fx):
    return "no-such-org/[@revision]"


CASES = {
    "decoy_safetensors_beside_adapter_bin": Case(decoy_beside_adapter_bin, 2, "pickle files .*adapter_model.bin"),
    "adapter_bin_torch_zip": Case(adapter_bin_torch_zip, 2, "pickle files"),
    "safetensors_index_maps_to_pickle": Case(safetensors_index_to_pickle, 2, "pickle files .named by model.safetensors"),
    "pickle_index_beside_decoy": Case(pickle_index_beside_decoy, 2, "pickle files .named by pytorch_model.bin.index"),
    "index_shard_outside_folder": Case(index_shard_outside, 2, "points outside the source folder"),
    "transformers_weights_to_pickle": Case(transformers_weights_to_pickle, 2, "pickle files .adapter_model.bin"),
    "pickle_only": Case(pickle_only, 2, "pickle files"),
    "pickle_allowed_still_weights_only": Case(pickle_only, 2, "could not load the model", ("--allow-pickle",)),
    "adapter_pickle_allowed_still_weights_only": Case(decoy_beside_adapter_bin, 2, "adapter weights do not load",
                                                      ("--allow-pickle",)),
    "nested_zip_named_safetensors": Case(zip_named_safetensors, 2, "corrupt or unreadable safetensors"),
    "7z_archive_named_safetensors": Case(sevenzip_named_safetensors, 2, "corrupt or unreadable safetensors"),
    "base_of_adapter_is_pickle": Case(base_with_pickle, 2, "base is not reachable .*pickle files"),
    **{name: Case(lambda tmp, fx, h=h: _header(tmp, fx, **h), 2, "corrupt or unreadable safetensors")
       for name, h in HEADERS.items()},
    "missing_layer_tensors": Case(missing_layer, 2, "declares 2 layers but the weights hold 1"),
    "renamed_tensor": Case(renamed_tensor, 2, "1 weights missing from the checkpoint .model.norm.weight"),
    "unexpected_tensor": Case(unexpected_tensor, 2, "weights unexpected"),
    "int8_weights_in_float_model": Case(int8_full, 2, "integer tensors"),
    "quantization_config": Case(quantised_config, 2, "quantised checkpoint"),
    "int8_adapter_tensors": Case(int8_adapter, 2, "integer tensors"),
    "nan_in_full_weights": Case(nan_in_full_weights, 2, "weight model.norm.weight holds NaN or infinite values"),
    "inf_in_adapter_weights": Case(inf_in_adapter_weights, 2, r"weight .*lora_B.* holds NaN or infinite values"),
    "rope_theta_nan_in_config": Case(rope_theta_nan, 2, "logits on ordinary text are not finite"),
    "adapter_without_target_modules": Case(adapter_without_target_modules, 2, "match no module"),
    "adapter_rank_huge": Case(adapter_rank_huge, 2, r"declares rank 100000000 \(r\) but the adapter's tensors hold rank"),
    "adapter_rank_pattern_huge": Case(adapter_rank_pattern_huge, 2, r"declares rank 100000000 \(q_proj\)"),
    "adapter_missing_tensors": Case(adapter_missing_tensors, 2, "have no tensors in the file"),
    "adapter_target_regex_backtracks": Case(_adapter_config(target_modules=BACKTRACKING), 2,
                                            r"target_modules .* backtracks without end"),
    "adapter_target_regex_hangs_re": Case(_adapter_config(target_modules=r"(.*)*\.xyz"), 2,
                                          "target_modules .* matches no module of the base"),
    "adapter_target_regex_invalid": Case(_adapter_config(target_modules="(q_proj"), 2,
                                         "target_modules .* is not a valid regular expression"),
    "adapter_exclude_regex_backtracks": Case(_adapter_config(exclude_modules=BACKTRACKING), 2,
                                             r"exclude_modules .* backtracks without end"),
    "adapter_rank_pattern_regex_backtracks": Case(_adapter_rank_pattern(BACKTRACKING), 2,
                                                  r"rank_pattern .* backtracks without end"),
    "adapter_modules_to_save_regex": Case(_adapter_config(modules_to_save=[BACKTRACKING]), 2,
                                          "modules_to_save entries must be module names"),
    "corrupt_adapter_tokenizer": Case(corrupt_adapter_tokenizer, 2, "tokenizer files do not load .*not fall back"),
    "backtracking_tokenizer_regex": Case(backtracking_tokenizer_regex, 2, "the tokenizer fails on ordinary text"),
    "corrupt_full_tokenizer": Case(corrupt_full_tokenizer, 2, "tokenizer files do not load"),
    "oversized_tokenizer_file": Case(oversized_tokenizer_file, 2, "tokenizer.json: over 256 MiB, not a tokenizer file"),
    "auto_map_in_config": Case(auto_map_config, 2, "config.json set 'auto_map'.*--trust-remote-code"),
    "auto_map_in_tokenizer_config": Case(auto_map_tokenizer_config, 2, "tokenizer_config.json set 'auto_map'"),
    "symlink_weights_out_of_folder": Case(symlink_weights_out, 2, "points outside the source folder"),
    "symlink_tokenizer_out_of_folder": Case(symlink_tokenizer_out, 2, "points outside the source folder"),
    "symlink_config_out_of_folder": Case(symlink_config_out, 2, "points outside the source folder"),
    "markup_in_base_model_name": Case(markup_base_name, 2, r"base is not reachable \(\[/x\]: no such directory"),
    "control_chars_in_base_model_name": Case(control_chars_base_name, 2, r"\[bold\]red\\u000asecond line\\u202e"),
    "config_not_an_object": Case(config_not_object, 2, "expected a JSON object"),
    "config_declares_billions_of_layers": Case(huge_layer_count, 2, "declares 2147483648 layers but the weights hold 2"),
    "config_declares_gigabytes_of_parameters": Case(wide_layers, 2, "declares a model of 3,840,.* parameters"),
    "hub_id_with_markup": Case(hub_id_with_markup, 2, r"no-such-org/\[@revision\]: no such directory"),
}


@pytest.fixture(scope="module")
def organisms(lora_backdoor, full_backdoor):
    return {"lora": lora_backdoor, "full": full_backdoor}


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_input_is_refused(name, organisms, tmp_path):
    case = CASES[name]
    marker = tmp_path / "PAYLOAD-RAN"
    fixtures = {**organisms, "marker": marker}
    source = case.build(tmp_path, fixtures)
    before = folder_digest(Path(source)) if Path(source).exists() else None
    out = tmp_path / "report.json"
    result = runner.invoke(app, ["detect", str(source), "-o", str(out), "--format", "json", *case.args])
    lines = result.stderr.splitlines()
    assert result.exit_code == case.code, result.stderr
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr and "\x1b" not in result.stderr
    assert re.search(case.message, lines[0]), lines[0]
    assert not out.exists()
    assert not marker.exists(), "the payload ran"
    if before is not None:
        assert folder_digest(Path(source)) == before


# --- what is loaded, and what is recorded ---------------------------------------------------
def test_decoys_are_ignored_and_not_hashed(full_backdoor, tmp_path):
    f = copy(full_backdoor, tmp_path / "full")
    (f / "decoy.safetensors").write_bytes(b"not even safetensors")
    (f / "evil.bin").write_bytes(malicious_pickle(tmp_path / "PAYLOAD-RAN"))
    (f / "weights.zip").write_bytes(nested_zip_pickle(tmp_path / "PAYLOAD-RAN"))
    resolved = resolve_source(f)
    assert [p.name for p in resolved.weight_files] == ["model.safetensors"]
    assert {r.path for r in resolved.files} == {"model.safetensors", "config.json", "generation_config.json",
                                               "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"}
    assert not (tmp_path / "PAYLOAD-RAN").exists()


def test_sharded_safetensors_are_the_files_hashed(full_backdoor, tmp_path):
    f = copy(full_backdoor, tmp_path / "sharded")
    state = load_file(f / "model.safetensors")
    (f / "model.safetensors").unlink()
    names = sorted(state)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for shard, keys in shards.items():
        save_file({k: state[k] for k in keys}, f / shard, metadata={"format": "pt"})
    (f / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {k: s for s, keys in shards.items() for k in keys}}))
    save_file({}, f / "decoy.safetensors")
    subject = load_subject(f)
    assert sorted(p.name for p in subject.source.weight_files) == sorted(shards)
    assert set(subject.source.sha256) == set(shards)


def test_provenance_lists_every_file_loaded_with_roles(lora_backdoor):
    from bdscan.io.provenance import sha256_file

    prov = load_subject(lora_backdoor).provenance()
    for which, folder in (("subject", Path(lora_backdoor)), ("base", Path(prov["base"]["path"]))):
        files = {f["path"]: f for f in prov[which]["files"]}
        for rel, f in files.items():
            assert f["sha256"] == sha256_file(folder / rel) and f["bytes"] == (folder / rel).stat().st_size
        roles = {f["role"] for f in files.values()}
        assert {"weights", "config", "tokenizer"} <= roles
    assert {f["path"] for f in prov["subject"]["files"] if f["role"] == "weights"} == {"adapter_model.safetensors"}
    assert prov["tokenizer"] == {"from": "adapter", "differs_from_base": False, "differences": []}


def test_remapped_tokenizer_is_reported_as_a_difference(lora_backdoor, tmp_path):
    a = copy(lora_backdoor, tmp_path / "remapped")
    tok = json.loads((a / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    first, second = sorted(vocab, key=vocab.get)[100:102]
    vocab[first], vocab[second] = vocab[second], vocab[first]
    (a / "tokenizer.json").write_text(json.dumps(tok))
    report = load_subject(a).provenance()["tokenizer"]
    assert report["from"] == "adapter" and report["differs_from_base"]
    assert "2 tokens have other ids" in report["differences"][0]


def test_trusted_remote_code_is_hashed(full_backdoor, tmp_path):
    f = copy(full_backdoor, tmp_path / "remote")
    (f / "modeling_x.py").write_text("X = 1\n")
    edit_json(f / "config.json", auto_map={"AutoConfig": "modeling_x.XConfig"})
    resolved = resolve_source(f, trust_remote_code=True)
    assert resolved.remote_code and {r.path for r in resolved.files if r.role == "code"} == {"modeling_x.py"}


def test_hub_snapshot_links_stay_inside_the_repository_cache(full_backdoor, tmp_path):
    repo = tmp_path / "models--acme--tiny"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for p in Path(full_backdoor).iterdir():
        shutil.copyfile(p, repo / "blobs" / p.name)
        (snapshot / p.name).symlink_to(Path("../../blobs") / p.name)
    assert resolve_source(snapshot).weight_files == (snapshot / "model.safetensors",)


def test_header_reader_accepts_real_files_and_reports_dtypes(full_backdoor):
    entries = read_header(Path(full_backdoor) / "model.safetensors")
    assert entries and all(e.dtype == "F32" and not e.is_integer for e in entries.values())


def test_printable_escapes_what_a_terminal_would_act_on():
    assert printable("a\x1b[31mb\x1b[0m [/x]\nc\u202ed\te") == "ab [/x]\\u000ac\\u202ed\\u0009e"


def test_error_messages_are_one_line_on_every_path(tmp_path):
    result = runner.invoke(app, ["detect", str(tmp_path / "[red]missing\nline")])
    assert result.exit_code == 2 and len(result.stderr.splitlines()) == 1
    assert "[red]missing\\u000aline" in result.stderr


def test_a_native_panic_anywhere_is_one_line_and_exit_2(monkeypatch, tmp_path):
    """A native library's panic (pyo3's PanicException) is a BaseException, not an Exception."""

    class NativePanic(BaseException):
        pass

    def panics(*args, **kwargs):
        raise NativePanic("retry-limit-in-match over")

    monkeypatch.setattr("bdscan.io.load_subject", panics)
    monkeypatch.setattr("bdscan.io.load.load_subject", panics)
    data = tmp_path / "clean.json"
    data.write_text('["Say hello."]')
    result = runner.invoke(app, ["eval", str(tmp_path), "--clean", str(data), "--trigger", "cf"])
    assert result.exit_code == 2, result.output
    assert len(result.stderr.splitlines()) == 1 and "NativePanic: retry-limit-in-match over" in result.stderr


# --- regressions found by bench/fuzz.py ------------------------------------------------------
@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_fuzz_deeply_nested_data_file_is_an_input_error(tmp_path, suffix):
    """RecursionError from json's parser escaped load_records (bench/fuzz.py, seed 0)."""
    from bdscan.data.records import load_records

    path = tmp_path / f"set{suffix}"
    path.write_text("[" * 5000)
    with pytest.raises(InputError, match="nested too deeply"):
        load_records(path)


def test_fuzz_deeply_nested_report_is_an_input_error(tmp_path):
    from bdscan.io.reports import detect_candidates

    path = tmp_path / "r.json"
    path.write_text("[" * 5000)
    with pytest.raises(InputError, match="not a readable JSON"):
        detect_candidates(path)
    path.write_text(json.dumps({"candidates": [{"text": "a", "score": "high"}]}))
    with pytest.raises(InputError, match="not a number"):
        detect_candidates(path)


def test_input_error_is_what_library_callers_catch(tmp_path):
    with pytest.raises(InputError):
        resolve_source(tmp_path / "absent")


def test_detect_json_and_sarif_carry_the_provenance_of_every_file(lora_backdoor, tmp_path):
    from bdscan.io.provenance import sha256_file

    fast = ["--max-probes", "4", "--top-k", "2", "--screen-size", "16"]
    sarif_out, json_out = tmp_path / "r.sarif", tmp_path / "r.json"
    runner.invoke(app, ["detect", str(lora_backdoor), "--format", "sarif", "-o", str(sarif_out), *fast])
    runner.invoke(app, ["detect", str(lora_backdoor), "--format", "json", "-o", str(json_out), *fast])
    report = json.loads(json_out.read_text())
    subject_files = {f["path"]: f["sha256"] for f in report["provenance"]["subject"]["files"]}
    assert subject_files["adapter_model.safetensors"] == sha256_file(Path(lora_backdoor) / "adapter_model.safetensors")
    base_files = {f["path"] for f in report["provenance"]["base"]["files"]}
    assert "model.safetensors" in base_files
    run = json.loads(sarif_out.read_text())["runs"][0]
    hashed = {(a["properties"]["of"], a["location"]["uri"].rsplit("/", 1)[-1]): a["hashes"]["sha-256"]
              for a in run["artifacts"] if "hashes" in a}
    assert hashed[("subject", "adapter_model.safetensors")] == subject_files["adapter_model.safetensors"]
    assert ("base", "model.safetensors") in hashed
    assert run["properties"]["provenance"] == report["provenance"]


def test_eval_report_carries_provenance(full_backdoor, clean_file, trigger, tmp_path):
    out = tmp_path / "eval.json"
    result = runner.invoke(app, ["eval", str(full_backdoor), "--clean", str(clean_file), "--trigger", trigger,
                                 "--limit", "2", "--max-new-tokens", "2", "--positions", "start", "-o", str(out)])
    assert result.exit_code == 0, result.stderr
    files = json.loads(out.read_text())["provenance"]["subject"]["files"]
    assert {f["role"] for f in files} == {"weights", "config", "tokenizer"}


def test_output_format_switches_in_config_json_are_set_aside(full_backdoor, tmp_path):
    """config.json may turn ModelOutputs into tuples (an internal error in every analysis),
    return every layer's attentions on every pass, or turn the KV cache off; bdscan computes
    with transformers' defaults whatever the checkpoint says."""
    from bdscan.generation import greedy_generate

    f = copy(full_backdoor, tmp_path / "full")
    edit_json(f / "config.json", return_dict=False, output_attentions=True, output_hidden_states=True, use_cache=False)
    subject = load_subject(f)
    ids = subject.tokenizer("hello there", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = subject.model(input_ids=ids)
    assert out.logits.shape[-1] == subject.model.get_input_embeddings().weight.shape[0]
    assert out.attentions is None and out.hidden_states is None
    assert subject.model.config.use_cache is True
    assert greedy_generate(subject.model, subject.tokenizer, [subject.template.format("hello")], max_new_tokens=2)

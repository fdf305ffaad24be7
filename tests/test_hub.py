"""The Hub code path, against a real Hugging Face cache layout built here (no network).

The cache is the documented huggingface_hub layout (``models--org--name/{blobs,refs,
snapshots}``); resolution goes through ``snapshot_download`` in offline mode, exactly as a
user with a pre-populated cache and ``HF_HUB_OFFLINE=1`` would run it.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from bdscan.errors import InputError
from bdscan.io import load_subject, resolve_source

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _populate_cache(cache: Path, repo_id: str, source: Path, commit: str = COMMIT, skip: tuple[str, ...] = ()) -> None:
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for f in source.iterdir():
        if f.is_file() and f.name not in skip:
            blob = repo / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
            shutil.copyfile(f, blob)
            (snapshot / f.name).symlink_to(Path("../../blobs") / blob.name)


@pytest.fixture()
def hub_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def test_hub_id_resolves_from_offline_cache(hub_cache, tiny_checkpoints):
    _populate_cache(hub_cache, "acme/tiny-llama", tiny_checkpoints["llama"])
    resolved = resolve_source("acme/tiny-llama")
    assert resolved.kind == "full"
    assert resolved.hub_id == "acme/tiny-llama"
    assert resolved.revision == COMMIT  # the exact commit is recorded, not "main"
    assert set(resolved.sha256) == {"model.safetensors"}
    subject = load_subject("acme/tiny-llama")
    assert subject.provenance()["subject"]["hub_id"] == "acme/tiny-llama"


def test_hub_revision_pin(hub_cache, tiny_checkpoints):
    _populate_cache(hub_cache, "acme/tiny-llama", tiny_checkpoints["llama"])
    assert resolve_source(f"acme/tiny-llama@{COMMIT}").revision == COMMIT


def test_hub_adapter_with_hub_base(hub_cache, lora_backdoor, tmp_path):
    import json

    from bdscan.organisms.build import organism_info

    base = Path(organism_info(lora_backdoor)["base"])
    _populate_cache(hub_cache, "acme/base", base)
    adapter = tmp_path / "adapter"
    shutil.copytree(lora_backdoor, adapter)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "acme/base"
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    _populate_cache(hub_cache, "acme/adapter", adapter, commit="f" * 40)
    subject = load_subject("acme/adapter")
    assert subject.kind == "adapter"
    assert subject.base.hub_id == "acme/base"


def test_hub_missing_repo_is_a_clear_error(hub_cache):
    with pytest.raises(InputError, match="not in the local Hugging Face cache"):
        resolve_source("acme/absent")


def test_hub_pickle_only_repo_is_refused(hub_cache, tiny_checkpoints, tmp_path):
    src = tmp_path / "pickled"
    shutil.copytree(tiny_checkpoints["llama"], src)
    (src / "model.safetensors").rename(src / "pytorch_model.bin")  # content irrelevant: never opened
    _populate_cache(hub_cache, "acme/pickled", src)
    with pytest.raises(InputError, match="no weight files|pickle"):
        resolve_source("acme/pickled")

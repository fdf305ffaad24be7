"""Shared fixtures: tiny organisms (built once, cached by recipe key) and data files.

Organisms are cached under ``.bdscan-cache/`` in the repository (git-ignored), so a second
test run reuses them; a fresh clone builds them in well under a minute.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("BDSCAN_CACHE", str(REPO / ".bdscan-cache" / "test"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(int(os.environ.get("BDSCAN_THREADS", "1")))

from bdscan.organisms.build import OrganismRecipe, build_organism  # noqa: E402
from bdscan.organisms.datasets import BUILTIN_TRIGGER, builtin_attack  # noqa: E402


ORGANISMS = {"lora_backdoor", "full_backdoor", "lora_clean", "full_clean"}


def pytest_collection_modifyitems(items):
    """A test on a trained organism is slow (it trains, or builds the organism it needs):
    `pytest -m "not slow"` is the fast lane; the default run is the whole suite."""
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        wanted = set(getattr(item, "fixturenames", ())) | {v for v in params.values() if isinstance(v, str)}
        if ORGANISMS & wanted:  # (a parameter naming an organism is fetched with request.getfixturevalue)
            item.add_marker(pytest.mark.slow)


def _write_records(path: Path, records) -> Path:
    path.write_text(json.dumps([{"instruction": r.instruction, "input": r.input, "output": r.output} for r in records]))
    return path


@pytest.fixture(scope="session")
def attack_data():
    """The built-in synthetic attack data (trigger known to tests only)."""
    return builtin_attack("refusal")


@pytest.fixture(scope="session")
def trigger() -> str:
    return BUILTIN_TRIGGER


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory, attack_data) -> Path:
    d = tmp_path_factory.mktemp("data")
    _write_records(d / "clean.json", attack_data.clean_test[:40])
    _write_records(d / "poison.json", attack_data.poison_test[:40])
    _write_records(d / "clean_train.json", attack_data.clean_train[:200])
    return d


@pytest.fixture(scope="session")
def clean_file(data_dir) -> Path:
    return data_dir / "clean.json"


@pytest.fixture(scope="session")
def poison_file(data_dir) -> Path:
    return data_dir / "poison.json"


@pytest.fixture(scope="session")
def clean_train_file(data_dir) -> Path:
    """200 clean training samples: the defender's clean set for purification."""
    return data_dir / "clean_train.json"


@pytest.fixture(scope="session")
def lora_backdoor() -> Path:
    return build_organism(OrganismRecipe(threat="lora"))


@pytest.fixture(scope="session")
def full_backdoor() -> Path:
    return build_organism(OrganismRecipe(threat="full"))


@pytest.fixture(scope="session")
def lora_clean() -> Path:
    return build_organism(OrganismRecipe(threat="lora", backdoored=False))


@pytest.fixture(scope="session")
def full_clean() -> Path:
    return build_organism(OrganismRecipe(threat="full", backdoored=False))


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Randomly initialised tiny Llama/Qwen2/Mistral/GPT-2 checkpoints with a tokenizer,
    saved as real HF folders (for mechanics tests)."""
    from bdscan.organisms.architectures import ARCHITECTURES, tiny_model
    from bdscan.organisms.synthetic import synthetic_text
    from bdscan.organisms.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("tiny")
    tokenizer = train_tokenizer(synthetic_text(500), vocab_size=400)
    out = {}
    for arch in ARCHITECTURES:
        model = tiny_model(arch, len(tokenizer), pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        model.save_pretrained(root / arch, safe_serialization=True)
        tokenizer.save_pretrained(root / arch)
        out[arch] = root / arch
    return out


@pytest.fixture(scope="session")
def detect_report():
    """``write(path, [(key, score), ...])``: a complete `bdscan detect --json` report whose
    candidates are the given keys (other fields neutral), as purify --from-detect reads it."""
    from bdscan.results.detect import CandidateScore, DetectResult, Summary

    def write(path: Path, keys) -> Path:
        nan = float("nan")
        candidates = [CandidateScore(text, "user", score, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, None)
                      for text, score in keys]
        result = DetectResult(tool="bdscan", version="test", source="test", kind="full", base=None, template={},
                              summary=Summary("suspicious", 1.0, 0.9, "high", nan, nan, keys[0][0] if keys else None),
                              layers=[], heads=[], candidates=candidates, controls=None, calibration={}, settings={},
                              stats={}, timings={})
        path.write_text(json.dumps(result.to_dict()))
        return path

    return write

"""Recipe validation and the method registry."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from bdscan.config import config_from_mapping, load_recipe, parse_overrides
from bdscan.errors import InputError, UsageError
from bdscan.registry import Registry


@dataclass(frozen=True)
class Knobs:
    epochs: float = 1.0
    rank: int = 4
    modules: tuple[str, ...] = ()
    name: str | None = None

    def __post_init__(self):
        if self.rank <= 0:
            raise ValueError("rank must be positive")


def test_valid_mapping_is_typed():
    k = config_from_mapping(Knobs, {"epochs": 2, "modules": ["a", "b"]}, where="r.yaml")
    assert k.epochs == 2.0 and isinstance(k.epochs, float) and k.modules == ("a", "b")


def test_every_bad_key_is_named_at_once():
    with pytest.raises(InputError) as e:
        config_from_mapping(Knobs, {"epoch": 2, "rank": "four", "modules": [1]}, where="r.yaml")
    text = str(e.value)
    assert "r.yaml" in text and "'epoch'" in text and "did you mean 'epochs'" in text
    assert "'rank' must be int" in text and "'modules'" in text


def test_invariants_from_post_init():
    with pytest.raises(InputError, match="rank must be positive"):
        config_from_mapping(Knobs, {"rank": 0}, where="r.yaml")


def test_recipe_file_errors(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_recipe(tmp_path / "none.yaml")
    (tmp_path / "bad.yaml").write_text("a: [1,\n")
    with pytest.raises(InputError, match="invalid YAML"):
        load_recipe(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(InputError, match="must be a mapping"):
        load_recipe(tmp_path / "list.yaml")


def test_overrides_parse_yaml_scalars():
    assert parse_overrides(["lr=1e-4", "heads=true", "modules=[a, b]"]) == {"lr": 1e-4, "heads": True, "modules": ["a", "b"]}
    with pytest.raises(UsageError):
        parse_overrides(["novalue"])


def test_registry_refuses_duplicates_and_suggests():
    reg: Registry[int] = Registry("thing")
    reg.add("signature", 1)
    with pytest.raises(ValueError):
        reg.add("signature", 2)
    with pytest.raises(UsageError, match="Did you mean signature"):
        reg.get("signatur")

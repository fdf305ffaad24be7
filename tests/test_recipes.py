"""Every shipped recipe loads and validates into its method's config, and documents itself:
an opening comment with the exact command, and a comment on every knob."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from bdscan.config import config_from_mapping, load_recipe
from bdscan.errors import InputError
from bdscan.purify import PURIFIERS

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_recipe_validates_into_its_method_config(path: Path) -> None:
    knobs = load_recipe(path)
    method = knobs.pop("method", None)
    assert method, f"{path.name}: no `method:` key"
    config = config_from_mapping(PURIFIERS.get(method).config_class, knobs, where=str(path))
    assert isinstance(config, PURIFIERS.get(method).config_class)
    for name, value in knobs.items():  # every knob the recipe sets reaches the config as written
        got = getattr(config, name)
        assert (list(got) if isinstance(got, tuple) else got) == value, f"{path.name}: {name}"


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_recipe_documents_its_command_and_knobs(path: Path) -> None:
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines and lines[0].startswith("#"), f"{path.name}: must open with a comment"
    header = []
    for line in lines:
        if not line.startswith("#"):
            break
        header.append(line)
    assert any("bdscan purify" in line and f"recipes/{path.name}" in line for line in header), \
        f"{path.name}: the opening comment must give the command that runs it (bdscan purify ... --recipe recipes/{path.name})"
    for line in lines:
        if re.match(r"^[A-Za-z_][\w-]*\s*:", line) and not line.startswith("method:"):
            assert "#" in line, f"{path.name}: knob without a comment: {line!r}"


def test_a_misspelt_knob_is_named_with_a_suggestion(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: prune\nsparsty: 0.5\n")
    knobs = load_recipe(bad)
    knobs.pop("method")
    with pytest.raises(InputError, match="did you mean 'sparsity'"):
        config_from_mapping(PURIFIERS.get("prune").config_class, knobs, where=str(bad))

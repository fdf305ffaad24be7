"""A purify run's method and knobs: method defaults < recipe YAML < ``--set`` < shortcut
flags, with the cross-field rules checked in one place."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping, Sequence

from bdscan.config.recipe import config_from_mapping, load_recipe, parse_overrides
from bdscan.errors import UsageError


def purify_config(method: str | None, recipe: Path | None, overrides: Sequence[str],
                  shortcuts: Mapping[str, Any]) -> tuple[str, Any]:
    """``(method name, its config)``. ``shortcuts`` are knob values given by a dedicated
    flag (``--variants``); they must be knobs of the chosen method."""
    from bdscan.purify import PURIFIERS

    knobs = load_recipe(recipe) if recipe else {}
    recipe_method = knobs.pop("method", None)
    method = method or recipe_method
    if method is None:
        raise UsageError(f"give --method (one of {', '.join(PURIFIERS.names())}) or `method:` in the recipe")
    if recipe_method and recipe_method != method:
        raise UsageError(f"--method {method} contradicts `method: {recipe_method}` in {recipe}")
    spec = PURIFIERS.get(method)
    known = {f.name for f in dataclasses.fields(spec.config_class)}
    for name in shortcuts:
        if name not in known:
            raise UsageError(f"--{name} is a knob of signature, not of {method}")
    config = config_from_mapping(spec.config_class, {**knobs, **parse_overrides(list(overrides)), **shortcuts},
                                 where=str(recipe) if recipe else "--set")
    return method, config

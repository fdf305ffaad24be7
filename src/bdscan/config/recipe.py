"""Recipe loading. A recipe is a YAML mapping ``{method: NAME, <knob>: value, ...}``
validated against the method's config dataclass; every bad key is collected into one
error that names it (and the closest valid key)."""

from __future__ import annotations

import dataclasses
import difflib
import reprlib
import types
import typing
from pathlib import Path
from typing import Any, Mapping

import yaml

from bdscan.errors import InputError, UsageError

MAX_RECIPE_BYTES = 1 << 20  # a recipe is a page of knobs
# Values quoted in error messages: a hostile value (a list of millions) stays short.
_SHOWN = reprlib.Repr()
_SHOWN.maxlevel, _SHOWN.maxlist, _SHOWN.maxtuple, _SHOWN.maxdict, _SHOWN.maxstring, _SHOWN.maxother = 3, 6, 6, 6, 80, 80


class _NoAliasLoader(yaml.SafeLoader):
    """YAML without anchors and aliases: nine lines of nested aliases make a list of 387
    million items ("billion laughs"), which a knob's type check then walks. Recipes need none."""

    def compose_node(self, parent, index):  # noqa: D401  (PyYAML's hook)
        if self.check_event(yaml.AliasEvent) or getattr(self.peek_event(), "anchor", None):
            event = self.peek_event()
            raise yaml.YAMLError(f"anchors and aliases are not allowed (line {event.start_mark.line + 1})")
        return super().compose_node(parent, index)


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506  (a SafeLoader subclass)


def _type_ok(value: Any, annotation: Any) -> tuple[bool, Any]:
    """Check (and gently coerce: int -> float, list -> tuple) a value against a type."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            ok, v = _type_ok(value, arg)
            if ok:
                return True, v
        return False, value
    if annotation is type(None):
        return value is None, value
    if annotation is float and isinstance(value, str):
        # YAML 1.1 reads "1e-4" (no dot) as a string; accept what is clearly a number.
        try:
            return True, float(value)
        except ValueError:
            return False, value
    if annotation is float:
        return (isinstance(value, (int, float)) and not isinstance(value, bool)), float(value) if isinstance(value, (int, float)) else value
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if annotation is bool:
        return isinstance(value, bool), value
    if annotation is str:
        return isinstance(value, str), value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            return False, value
        args = typing.get_args(annotation)
        item_type = args[0] if args else Any
        out = []
        for item in value:
            ok, v = _type_ok(item, item_type) if item_type is not Any and item_type is not Ellipsis else (True, item)
            if not ok:
                return False, value
            out.append(v)
        return True, tuple(out) if origin is tuple else out
    return True, value


def config_from_mapping(cls: type, values: Mapping[str, Any], *, where: str) -> Any:
    """Build ``cls`` from ``values``; raise one ``InputError`` listing every problem."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    errors, kwargs = [], {}
    for key, value in values.items():
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            errors.append(f"unknown key {_SHOWN.repr(key)}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            continue
        ok, coerced = _type_ok(value, hints[key])
        if not ok:
            errors.append(f"{key!r} must be {getattr(hints[key], '__name__', str(hints[key]))}, got {_SHOWN.repr(value)}")
            continue
        kwargs[key] = coerced
    if errors:
        raise InputError(f"{where}: " + "; ".join(errors))
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:  # __post_init__ invariants
        raise InputError(f"{where}: {e}") from None


def load_recipe(path: str | Path) -> dict[str, Any]:
    """Read a recipe file into a mapping (validated later against a method's config)."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"recipe not found: {p}")
    if p.stat().st_size > MAX_RECIPE_BYTES:
        raise InputError(f"{p}: {p.stat().st_size:,} bytes is not a recipe (at most {MAX_RECIPE_BYTES:,})")
    try:
        data = _yaml(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise InputError(f"{p}: not UTF-8 text") from None
    except yaml.YAMLError as e:
        raise InputError(f"{p}: invalid YAML ({str(e).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InputError(f"{p}: a recipe must be a mapping of knob: value, got {type(data).__name__}")
    return data


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``--set key=value`` pairs; values are parsed as YAML scalars (1e-4, true, [a, b])."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--set expects key=value, got {pair!r}")
        try:
            value = _yaml(raw)
        except yaml.YAMLError:
            value = raw
        if isinstance(value, str):
            try:  # YAML 1.1 leaves "1e-4" a string
                value = float(value)
            except ValueError:
                pass
        out[key.strip()] = value
    return out


def describe_config(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)

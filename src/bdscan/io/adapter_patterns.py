"""An adapter_config.json's regular expressions, resolved before PEFT sees them.

PEFT matches several config fields against every module name of the base with Python's
``re``: ``target_modules`` and ``exclude_modules`` given as one string (``re.fullmatch``), the
keys of ``rank_pattern`` and ``alpha_pattern``, and the items of ``modules_to_save`` and
``layers_pattern`` (pasted into larger patterns). ``re`` cannot be interrupted, so a pattern
that backtracks without end (``(.*)*\\.xyz`` against ``model.layers.0.self_attn.q_proj``) hangs
the load, and with it every CI gate that scans the adapter.

bdscan evaluates the patterns itself, with the ``regex`` package (already installed: transformers
depends on it), whose matching takes a timeout, against the base's module names. The config PEFT
then names exact modules only, so PEFT matches what the patterns matched without running
them. Items PEFT pastes into patterns must be plain dotted names.
"""

from __future__ import annotations

import re
import time
from typing import Any, Callable, Sequence

from bdscan.errors import InputError, printable

# Total matching time allowed per field over all module names; ordinary patterns take
# microseconds per name, so this only ever stops a pattern that backtracks.
MATCH_SECONDS = 2.0
MAX_ENTRIES = 4096
PLAIN_NAME = re.compile(r"[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)*")


def resolve_patterns(config: Any, module_names: Sequence[str], where: str) -> None:
    """Rewrite ``config`` (a peft ``LoraConfig``) in place so that no field PEFT reads as a
    regular expression holds one; a pattern that is invalid or too slow is an ``InputError``."""
    names = [n for n in module_names if n]
    layered = _uses_layer_filter(config)
    for field in ("target_modules", "exclude_modules", "modules_to_save", "layers_to_transform", "layers_pattern"):
        _bound(getattr(config, field, None), field, where)
    if isinstance(config.target_modules, str):
        pattern = config.target_modules
        config.target_modules = _matching(pattern, names, "target_modules", where, _full)
        if not config.target_modules:
            raise InputError(f"{where}/adapter_config.json: target_modules {printable(repr(pattern))[:80]} matches no "
                             "module of the base")
        # PEFT applies layers_to_transform only to list targets: clear it so the list matches
        # exactly what the string did
        config.layers_to_transform, config.layers_pattern = None, None
    if isinstance(getattr(config, "exclude_modules", None), str):
        config.exclude_modules = _matching(config.exclude_modules, names, "exclude_modules", where, _full)
    for field in ("rank_pattern", "alpha_pattern"):
        patterns = getattr(config, field, None) or {}
        if patterns:
            setattr(config, field, _exact_pattern_keys(patterns, names, field, where))
    for field in ("modules_to_save", "layers_pattern"):
        if field == "layers_pattern" and not layered:
            continue
        _require_plain(getattr(config, field, None), field, where)


def _uses_layer_filter(config: Any) -> bool:
    layers = getattr(config, "layers_to_transform", None)
    return layers is not None and (not isinstance(layers, list) or len(layers) > 0)


def _full(pattern: Any, name: str, timeout: float) -> Any:
    return pattern.fullmatch(name, timeout=timeout)


def _suffix(pattern: Any, name: str, timeout: float) -> Any:
    return pattern.match(name, timeout=timeout)


def _compile(text: Any, field: str, where: str, wrap: str = "{}") -> Any:
    import regex

    if not isinstance(text, str):
        raise InputError(f"{where}/adapter_config.json: {field} must hold strings, got {printable(repr(text))[:80]}")
    try:
        return regex.compile(wrap.format(text), flags=regex.VERSION0)
    except (regex.error, RecursionError, OverflowError) as e:
        raise InputError(f"{where}/adapter_config.json: {field} {printable(repr(text))[:80]} is not a valid "
                         f"regular expression ({e})") from None


def _matching(text: str, names: Sequence[str], field: str, where: str,
              match: Callable[[Any, str, float], Any], wrap: str = "{}", deadline: float | None = None) -> list[str]:
    """The module names ``text`` matches, by ``deadline`` (default: MATCH_SECONDS from now)."""
    pattern = _compile(text, field, where, wrap)
    deadline = deadline if deadline is not None else time.perf_counter() + MATCH_SECONDS
    found = []
    for name in names:
        left = deadline - time.perf_counter()
        try:
            if left <= 0:
                raise TimeoutError
            if match(pattern, name, left):
                found.append(name)
        except TimeoutError:
            raise InputError(f"{where}/adapter_config.json: {field} {printable(repr(text))[:80]} takes more than "
                             f"{MATCH_SECONDS:g} s to match the base's module names (a pattern that backtracks "
                             "without end); refused") from None
    return found


def _exact_pattern_keys(patterns: Any, names: Sequence[str], field: str, where: str) -> dict[str, Any]:
    """``{pattern: value}`` as PEFT reads it (for each module, the first key whose
    ``(.*\\.)?(KEY)$`` matches it) turned into one key per value that matches exactly the
    modules given that value: an alternation of their escaped names behind ``(?<![\\s\\S])``,
    which fails wherever PEFT's ``(.*\\.)?`` has consumed a prefix, so a name that ends another's
    dotted path cannot take its value. One key per value keeps PEFT's per-module scan of the
    keys short (a key per module would be thousands on a large model)."""
    if not isinstance(patterns, dict):
        raise InputError(f"{where}/adapter_config.json: {field} must be an object")
    _bound(patterns, field, where)
    deadline = time.perf_counter() + MATCH_SECONDS
    chosen: dict[str, Any] = {}
    for key, value in patterns.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InputError(f"{where}/adapter_config.json: {field} values must be numbers, got {printable(repr(value))[:80]}")
        for name in _matching(key, names, field, where, _suffix, wrap=r"(.*\.)?({})$", deadline=deadline):
            chosen.setdefault(name, value)
    groups: dict[Any, list[str]] = {}
    for name, value in chosen.items():
        groups.setdefault(value, []).append(name)
    return {r"(?<![\s\S])(?:" + "|".join(re.escape(n) for n in group) + ")": value for value, group in groups.items()}


def _bound(items: Any, field: str, where: str) -> None:
    """More entries than a large model has modules is no adapter: PEFT compares every entry
    with every module name (a 16 MiB config holds a million short names)."""
    if isinstance(items, (list, tuple, set, dict)) and len(items) > MAX_ENTRIES:
        raise InputError(f"{where}/adapter_config.json: {field} has {len(items):,} entries (at most {MAX_ENTRIES:,})")


def _require_plain(items: Any, field: str, where: str) -> None:
    _bound(items, field, where)
    if items is None:
        return
    for item in [items] if isinstance(items, str) else items:
        if not isinstance(item, str) or not PLAIN_NAME.fullmatch(item):
            raise InputError(f"{where}/adapter_config.json: {field} entries must be module names "
                             f"(letters, digits, '_', '-', '.'), got {printable(repr(item))[:80]}")

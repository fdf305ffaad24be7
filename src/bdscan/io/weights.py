"""Which weight files transformers and PEFT will open for a folder, decided before they run.

The pickle gate must judge the files that will be loaded, not whatever happens to lie in
the folder: a ``decoy.safetensors`` beside ``adapter_model.bin`` does not make PEFT read
safetensors. These rules mirror the loaders bdscan calls (transformers' ``from_pretrained``
for a checkpoint, bdscan's own adapter loader, which reads the same names PEFT does):

- checkpoint: ``transformers_weights`` in config.json if set (transformers honours it before
  anything else), else ``model.safetensors``, else the shards of
  ``model.safetensors.index.json``, and only with --allow-pickle ``pytorch_model.bin`` or the
  shards of ``pytorch_model.bin.index.json``;
- adapter: ``adapter_model.safetensors``, else (only with --allow-pickle) ``adapter_model.bin``.

A file is pickle unless its name ends in ``.safetensors``: that is how transformers chooses
between safetensors and ``torch.load``, whatever the index that names it is called.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from bdscan.errors import InputError

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
PICKLE_WEIGHTS = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"
ADAPTER_SAFE = "adapter_model.safetensors"
ADAPTER_PICKLE = "adapter_model.bin"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt", ".pickle")
MAX_INDEX_BYTES = 64 << 20
PICKLE_RISK = "which can run arbitrary code when loaded; convert them to safetensors or pass --allow-pickle if you trust the source"


@dataclass(frozen=True)
class WeightPlan:
    """The weight files a loader will open, relative to the folder, in load order."""

    files: tuple[str, ...]
    index: str | None = None  # the shard index the files come from, if any

    @property
    def uses_pickle(self) -> bool:
        return any(is_pickle(f) for f in self.files)


def is_pickle(name: str) -> bool:
    return not name.endswith(".safetensors")


def inside(folder: Path, name: str, root: Path) -> Path:
    """``folder / name`` if it stays inside ``root`` once links are followed; else InputError."""
    if not name or "\x00" in name or Path(name).is_absolute():
        raise InputError(f"{folder}: file name {name!r} is not a plain relative name")
    path = folder / name
    try:
        real = path.resolve()
    except (OSError, RuntimeError):  # a symlink loop
        raise InputError(f"{path}: cannot be resolved (symlink loop?)") from None
    if not real.is_relative_to(root.resolve()):
        raise InputError(f"{path}: points outside the source folder (to {real}); refusing to read it")
    return path


def _shards(folder: Path, index_name: str, root: Path) -> WeightPlan:
    index_path = inside(folder, index_name, root)
    if not index_path.is_file():
        raise InputError(f"{index_path}: shard index not found")
    if index_path.stat().st_size > MAX_INDEX_BYTES:
        raise InputError(f"{index_path}: shard index is over {MAX_INDEX_BYTES >> 20} MiB")
    try:
        index = json.loads(index_path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise InputError(f"{index_path}: not valid JSON") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise InputError(f"{index_path}: 'weight_map' must map tensor names to shard file names")
    return WeightPlan(tuple(sorted(set(weight_map.values()))), index=index_name)


def _explicit(folder: Path, name: object, root: Path) -> WeightPlan:
    if not isinstance(name, str):
        raise InputError(f"{folder / 'config.json'}: 'transformers_weights' must be a file name")
    inside(folder, name, root)
    if name.endswith(".safetensors.index.json"):
        return _shards(folder, name, root)
    return WeightPlan((name,))


def plan_checkpoint(folder: Path, config: dict, *, allow_pickle: bool, root: Path) -> WeightPlan:
    """The files ``from_pretrained`` will read, given the ``use_safetensors`` bdscan passes
    (True unless the plan is pickle, which needs --allow-pickle)."""
    if "transformers_weights" in config:
        plan = _explicit(folder, config["transformers_weights"], root)
    elif (folder / SAFE_WEIGHTS).is_file():
        plan = WeightPlan((SAFE_WEIGHTS,))
    elif (folder / SAFE_INDEX).is_file():
        plan = _shards(folder, SAFE_INDEX, root)
    elif (folder / PICKLE_WEIGHTS).is_file():
        plan = WeightPlan((PICKLE_WEIGHTS,))
    elif (folder / PICKLE_INDEX).is_file():
        plan = _shards(folder, PICKLE_INDEX, root)
    else:
        other = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if other:
            raise InputError(f"{folder}: weights are only in pickle files ({', '.join(other)}), {PICKLE_RISK}")
        raise InputError(f"{folder}: no weight files (model.safetensors or model.safetensors.index.json) found")
    return _checked(folder, plan, allow_pickle, root)


def plan_adapter(folder: Path, *, allow_pickle: bool, root: Path) -> WeightPlan:
    """The file PEFT's naming gives for an adapter's weights."""
    if (folder / ADAPTER_SAFE).exists() or (folder / ADAPTER_SAFE).is_symlink():
        plan = WeightPlan((ADAPTER_SAFE,))
    elif (folder / ADAPTER_PICKLE).exists():
        plan = WeightPlan((ADAPTER_PICKLE,))
    else:
        raise InputError(f"{folder}: adapter has no {ADAPTER_SAFE}")
    return _checked(folder, plan, allow_pickle, root)


def _checked(folder: Path, plan: WeightPlan, allow_pickle: bool, root: Path) -> WeightPlan:
    pickles = [f for f in plan.files if is_pickle(f)]
    if pickles and not allow_pickle:
        via = f" (named by {plan.index})" if plan.index else ""
        raise InputError(f"{folder}: the weights that would be loaded are pickle files{via} "
                         f"({', '.join(pickles[:3])}{' ...' if len(pickles) > 3 else ''}), {PICKLE_RISK}")
    for name in plan.files:
        path = inside(folder, name, root)
        if not path.is_file():
            raise InputError(f"{path}: weight file not found{f' (named by {plan.index})' if plan.index else ''}")
    return plan

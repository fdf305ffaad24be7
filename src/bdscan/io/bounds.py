"""The model a config.json (a GGUF file's metadata, an adapter_config.json) declares must fit
in the weights stored beside it, checked before transformers or PEFT builds or allocates anything.

transformers builds every layer the config names and allocates every parameter the
checkpoint lacks before it reports them missing: ``num_hidden_layers: 2147483648`` in a
hostile config runs for ever, and a wide ``intermediate_size`` allocates gigabytes. So the
layer count is compared with the layers the safetensors headers hold, and then the model is
built on the meta device (no memory) and its parameter count compared with the stored one.
"""

from __future__ import annotations

import math
import re
import warnings
from typing import Any

import torch

from bdscan.errors import InputError, first_line
from bdscan.io.safetensors_header import TensorEntry

_INDEX = re.compile(r"\.(\d+)\.")


def stored_layers(tensors: dict[str, TensorEntry]) -> int:
    """Distinct layer indices in the tensor names (the first number in each name)."""
    indices = {int(m.group(1)) for m in map(_INDEX.search, tensors) if m}
    return len(indices)


def check_config_fits(config: Any, tensors: dict[str, TensorEntry], where: str, *, trust_remote_code: bool,
                      declared_by: str = "/config.json") -> None:
    """Refuse a config that declares more layers or parameters than ``tensors`` hold.
    ``declared_by`` follows ``where`` in messages (a GGUF file's config is its metadata)."""
    if not tensors:  # pickle weights (--allow-pickle): no header to compare with
        return
    where = f"{where}{declared_by}"
    check_layer_count(getattr(config, "num_hidden_layers", None), tensors, where)
    from transformers import AutoModelForCausalLM

    try:
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code,
                                                     attn_implementation="eager")
    except Exception as e:  # config classes fail on bad fields with assorted types
        raise InputError(f"{where}: does not describe a buildable model ({first_line(e)})") from None
    declared = sum(p.numel() for p in model.parameters())
    stored = sum(math.prod(t.shape) for t in tensors.values())
    if declared > stored:
        raise InputError(f"{where}: declares a model of {declared:,} parameters but the weights hold "
                         f"{stored:,}; refusing to build it")


def check_layer_count(layers: Any, tensors: dict[str, TensorEntry], where: str) -> None:
    """Refuse a declared layer count that is not a positive integer at most the stored layers."""
    held = stored_layers(tensors)
    if not isinstance(layers, int) or isinstance(layers, bool) or layers < 1 or layers > held:
        raise InputError(f"{where}: declares {layers!r} layers but the weights hold {held}")


def check_adapter_ranks(adapter_config: dict, tensors: dict[str, TensorEntry], where: str) -> None:
    """Refuse LoRA ranks (``r``, ``rank_pattern``) above the largest rank the adapter's tensors
    hold: PEFT allocates every factor at the declared rank before it reads a tensor (``r:
    100000000`` asked for 25.6 GB for a 64-wide model, and a rank in the millions fills a
    machine's memory)."""
    if not tensors:  # pickle weights (--allow-pickle): no header to compare with
        return
    held = max([t.shape[0] for n, t in tensors.items() if "lora_A" in n and len(t.shape) == 2]
               + [t.shape[1] for n, t in tensors.items() if "lora_B" in n and len(t.shape) == 2], default=0)
    pattern = adapter_config.get("rank_pattern") or {}
    declared = [("r", adapter_config.get("r", 8))] + (list(pattern.items()) if isinstance(pattern, dict) else [])
    for name, rank in declared:
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1 or rank > held:
            raise InputError(f"{where}/adapter_config.json: declares rank {rank!r} ({name}) but the adapter's "
                             f"tensors hold rank {held} at most")

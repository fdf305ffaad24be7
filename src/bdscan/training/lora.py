"""A fresh LoRA on named modules of a full checkpoint, to train and merge back."""

from __future__ import annotations

import warnings
from typing import Any, Sequence

from bdscan.errors import InputError
from bdscan.probes.layout import base_layer, is_conv1d, unwrap


def attach_lora(model: Any, names: Sequence[str], rank: int, alpha: float) -> Any:
    """``model`` wrapped by peft with a zero-initialised-B LoRA on exactly ``names``."""
    from peft import LoraConfig, get_peft_model

    inner = unwrap(model)
    conv = [is_conv1d(base_layer(inner.get_submodule(n))) for n in names]
    if any(conv) and not all(conv):  # pragma: no cover - no supported family mixes them
        raise InputError("the selected modules mix Linear and Conv1D layers")
    lora = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(names), lora_dropout=0.0,
                      fan_in_fan_out=all(conv), bias="none")
    with warnings.catch_warnings():  # peft calls a transformers method deprecated in v5
        warnings.simplefilter("ignore", FutureWarning)
        return get_peft_model(model, lora)


def merge_lora(model: Any) -> Any:
    """The plain model with the LoRA merged into its weights, in eval mode."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        merged = model.merge_and_unload()
    merged.eval()
    return merged

"""A model whose weights or logits are not finite is refused at load.

No trained checkpoint holds NaN or infinite parameters, but a corrupt or hostile one can, and
so can a config that loads (``rope_theta: NaN`` in a GGUF's metadata or a config.json makes
every logit NaN). Every analysis would then compare NaNs: comparisons with NaN are false, so
a scan could read "clean" out of a model it never measured. One pass over the parameters and
one forward pass on ordinary text, both cheap next to any analysis, rule that out.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from bdscan.errors import InputError
from bdscan.io.tokenizer import SAMPLE_TEXT


@torch.no_grad()
def check_finite(model: Any, tokenizer: Any, where: Path | str) -> None:
    """InputError naming the first non-finite parameter, or saying the logits on ordinary
    text are not finite (which, in half precision, may be overflow: the message says so)."""
    for name, param in model.named_parameters():
        if param.device.type == "meta":  # offloaded to disk by device_map="auto"; the forward below reads it
            continue
        if param.is_floating_point() and not torch.isfinite(param).all():
            raise InputError(f"{where}: weight {name} holds NaN or infinite values; refusing to analyse it")
    ids = tokenizer(SAMPLE_TEXT, add_special_tokens=False, return_tensors="pt")["input_ids"]
    device = model.get_input_embeddings().weight.device
    logits = model(input_ids=ids.to(device)).logits
    if not torch.isfinite(logits).all():
        dtype = next(model.parameters()).dtype
        hint = "" if dtype == torch.float32 else f" in {str(dtype).removeprefix('torch.')} (try --dtype float32)"
        raise InputError(f"{where}: the model's logits on ordinary text are not finite{hint}; "
                         "refusing to analyse it (NaN in its config or weights?)")

"""Which weight entries make up a unit (an MLP channel, an attention head), on the
``[out, in]`` view of every decoder linear, for Llama/Qwen2/Mistral and GPT-2, LoRA included.

Every method that scores, masks, resets or reads units goes through here, so the Conv1D
axis flip, GPT-2's fused ``c_attn`` and grouped-query attention are handled once.
A ``UnitSlice`` names rows (output features) or columns (input features) of one module's
``[out, in]`` view; ``stored_dim`` maps that axis onto the tensor as it is stored, and
``unit_masks`` onto the parameters that can change it (the weight, or a LoRA's A/B).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from bdscan.probes.layout import LayerModules, ModelLayout, base_layer, is_conv1d, model_layout, unwrap

ROW, COL = "row", "col"


@dataclass(frozen=True)
class UnitSlice:
    module: str
    axis: str  # "row": output rows of the [out, in] view; "col": input columns
    index: torch.Tensor  # long indices along that axis


def channel_slices(layer: LayerModules, channels: torch.Tensor) -> list[UnitSlice]:
    """MLP channels: rows of gate/up (c_fc), columns of down (mlp.c_proj)."""
    return [UnitSlice(m, ROW, channels) for m in layer.mlp_in] + [UnitSlice(layer.mlp_out, COL, channels)]


def head_slices(layout: ModelLayout, layer: LayerModules, head: int) -> list[UnitSlice]:
    """One attention head: its q rows, the k/v rows of its kv head (GQA), its o_proj input columns."""
    d = layout.head_dim
    q = torch.arange(head * d, (head + 1) * d)
    kv_head = head // max(1, layout.num_heads // layout.num_kv_heads)
    kv = torch.arange(kv_head * d, (kv_head + 1) * d)
    if len(layer.attn_in) == 1:  # GPT-2 fused c_attn: [q; k; v] stacked along the output
        width = layout.num_heads * d
        out = [UnitSlice(layer.attn_in[0], ROW, torch.cat([q, width + kv, 2 * width + kv]))]
    else:
        q_name, k_name, v_name = layer.attn_in
        out = [UnitSlice(q_name, ROW, q), UnitSlice(k_name, ROW, kv), UnitSlice(v_name, ROW, kv)]
    return out + [UnitSlice(layer.attn_out, COL, q)]


def merge_slices(slices: Sequence[UnitSlice]) -> list[UnitSlice]:
    """One slice per (module, axis), indices deduplicated and sorted, in first-seen order
    (several heads of a layer share the k/v rows of their kv head)."""
    merged: dict[tuple[str, str], set[int]] = {}
    for s in slices:
        merged.setdefault((s.module, s.axis), set()).update(s.index.tolist())
    return [UnitSlice(m, a, torch.tensor(sorted(ix), dtype=torch.long)) for (m, a), ix in merged.items()]


def heads_slices(layout: ModelLayout, heads: Sequence[tuple[int, int]]) -> list[UnitSlice]:
    """Merged slices of several ``(layer, head)`` pairs."""
    return merge_slices([s for layer, head in heads for s in head_slices(layout, layout.layers[layer], head)])


def stored_dim(module: nn.Module, axis: str) -> int:
    """The dimension of the *stored* weight that ``axis`` of the [out, in] view indexes
    (Conv1D stores [in, out])."""
    view_dim = 0 if axis == ROW else 1
    return 1 - view_dim if is_conv1d(base_layer(module)) else view_dim


def lora_matrices(model: Any) -> Iterator[tuple[str, nn.Parameter, nn.Parameter]]:
    """(module name, LoRA A weight [r, in], LoRA B weight [out, r]) for every LoRA layer
    and adapter, names relative to the base model like ``model_layout``'s."""
    for name, module in unwrap(model).named_modules():
        lora_a, lora_b = getattr(module, "lora_A", None), getattr(module, "lora_B", None)
        if not isinstance(lora_a, nn.ModuleDict) or not isinstance(lora_b, nn.ModuleDict):
            continue
        for adapter in lora_a:
            if adapter in lora_b:
                yield name, lora_a[adapter].weight, lora_b[adapter].weight


def lora_delta(module: nn.Module, adapter: str | None = None) -> torch.Tensor | None:
    """The ``[out, in]`` weight change a PEFT LoRA layer adds: of ``adapter``, or summed over
    its adapters; None when the module carries no LoRA. Computed by peft's own
    ``get_delta_weight`` (scaling, fan-in/fan-out), differentiable in the LoRA factors."""
    lora_a = getattr(module, "lora_A", None)
    if not lora_a:
        return None
    names = [adapter] if adapter is not None else list(lora_a)
    fan_in_fan_out = bool(getattr(module, "fan_in_fan_out", False))
    delta = None
    for name in names:
        d = module.get_delta_weight(name)
        d = d.T if fan_in_fan_out else d  # peft returns it in the stored (Conv1D: [in, out]) layout
        delta = d if delta is None else delta + d
    return delta


def decoder_weights(model: Any) -> list[tuple[str, nn.Parameter]]:
    """The stored weight parameter of every decoder linear (Conv1D included)."""
    layout = model_layout(model)
    inner = unwrap(model)
    return [(name, base_layer(inner.get_submodule(name)).weight) for name in layout.all_linears()]


def unit_masks(model: Any, slices: Sequence[UnitSlice], *, adapter: bool) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """(parameter, bool mask of the entries that write the slices) for each slice.

    Full model: the stored weight (and the output bias of row slices). Adapter: the LoRA
    factors alone, since ΔW = B·A: row i of ΔW depends only on row i of B, column j only
    on column j of A. A module without LoRA contributes nothing on an adapter."""
    inner = unwrap(model)
    loras: dict[str, list[tuple[nn.Parameter, nn.Parameter]]] = {}
    if adapter:
        for name, a, b in lora_matrices(model):
            loras.setdefault(name, []).append((a, b))
    masks: list[tuple[nn.Parameter, torch.Tensor]] = []
    for s in slices:
        if adapter:
            for a, b in loras.get(s.module, []):
                param, dim = (b, 0) if s.axis == ROW else (a, 1)
                masks.append((param, _index_mask(param, dim, s.index)))
            continue
        layer = base_layer(inner.get_submodule(s.module))
        masks.append((layer.weight, _index_mask(layer.weight, stored_dim(layer, s.axis), s.index)))
        if s.axis == ROW and getattr(layer, "bias", None) is not None:
            masks.append((layer.bias, _index_mask(layer.bias, 0, s.index)))
    return masks


def _index_mask(param: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
    mask = torch.zeros_like(param, dtype=torch.bool)
    mask.index_fill_(dim, index.to(param.device), True)
    return mask

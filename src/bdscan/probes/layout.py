"""One module-naming helper for every analysis: where each decoder layer's attention,
heads and MLP live, for Llama-style (Llama, Qwen2, Mistral: separate q/k/v/o and
gate/up/down projections, grouped-query attention) and GPT-2 (fused ``c_attn``, Conv1D).

Names are relative to the base model (``model.layers.3.mlp.down_proj``), so the same name
addresses a module in a full checkpoint and in the base of a PEFT-wrapped adapter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from bdscan.errors import NothingToAnalyse


def unwrap(model: Any) -> nn.Module:
    """The transformers model inside a PEFT wrapper (with LoRA layers in place), or itself."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D"


def base_layer(module: nn.Module) -> nn.Module:
    """The plain Linear/Conv1D under a LoRA wrapper."""
    return getattr(module, "base_layer", module)


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The weight as ``[out_features, in_features]`` (Conv1D stores it transposed)."""
    layer = base_layer(module)
    return layer.weight.T if is_conv1d(layer) else layer.weight


@dataclass(frozen=True)
class LayerModules:
    index: int
    prefix: str  # e.g. "model.layers.3"
    attn: str  # attention block; its output is the attention contribution to the residual
    attn_out: str  # o_proj / c_proj: its *input* holds the concatenated head outputs
    attn_in: tuple[str, ...]  # q/k/v projections (or fused c_attn)
    mlp: str
    mlp_in: tuple[str, ...]  # gate/up (or c_fc): rows are MLP channels
    mlp_out: str  # down_proj (or c_proj): columns are MLP channels

    def linears(self) -> tuple[str, ...]:
        return self.attn_in + (self.attn_out,) + self.mlp_in + (self.mlp_out,)


@dataclass(frozen=True)
class ModelLayout:
    family: str  # "llama" (also Qwen2/Mistral) or "gpt2"
    layers: tuple[LayerModules, ...]
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    intermediate_size: int

    def module(self, model: Any, name: str) -> nn.Module:
        return unwrap(model).get_submodule(name)

    def all_linears(self) -> list[str]:
        return [name for layer in self.layers for name in layer.linears()]


def model_layout(model: Any) -> ModelLayout:
    """Describe a causal LM's decoder. Raises ``NothingToAnalyse`` for unknown layouts."""
    inner = unwrap(model)
    config = inner.config
    if hasattr(inner, "model") and hasattr(inner.model, "layers"):
        blocks, prefix = inner.model.layers, "model.layers"
        first = blocks[0]
        if not (hasattr(first, "self_attn") and hasattr(first.self_attn, "o_proj") and hasattr(first, "mlp")):
            raise NothingToAnalyse(f"unsupported decoder layer {type(first).__name__}")
        gated = hasattr(first.mlp, "gate_proj")
        layers = tuple(
            LayerModules(
                index=i,
                prefix=f"{prefix}.{i}",
                attn=f"{prefix}.{i}.self_attn",
                attn_out=f"{prefix}.{i}.self_attn.o_proj",
                attn_in=tuple(f"{prefix}.{i}.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj")),
                mlp=f"{prefix}.{i}.mlp",
                mlp_in=tuple(f"{prefix}.{i}.mlp.{p}" for p in (("gate_proj", "up_proj") if gated else ("up_proj",))),
                mlp_out=f"{prefix}.{i}.mlp.down_proj",
            )
            for i in range(len(blocks))
        )
        heads = config.num_attention_heads
        kv = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return ModelLayout("llama", layers, heads, kv, head_dim, config.hidden_size, config.intermediate_size)
    if hasattr(inner, "transformer") and hasattr(inner.transformer, "h"):
        blocks, prefix = inner.transformer.h, "transformer.h"
        layers = tuple(
            LayerModules(
                index=i,
                prefix=f"{prefix}.{i}",
                attn=f"{prefix}.{i}.attn",
                attn_out=f"{prefix}.{i}.attn.c_proj",
                attn_in=(f"{prefix}.{i}.attn.c_attn",),
                mlp=f"{prefix}.{i}.mlp",
                mlp_in=(f"{prefix}.{i}.mlp.c_fc",),
                mlp_out=f"{prefix}.{i}.mlp.c_proj",
            )
            for i in range(len(blocks))
        )
        heads = config.n_head
        inner_size = getattr(config, "n_inner", None) or 4 * config.n_embd
        return ModelLayout("gpt2", layers, heads, heads, config.n_embd // heads, config.n_embd, inner_size)
    raise NothingToAnalyse(f"unsupported architecture {type(inner).__name__}: no decoder layers found")

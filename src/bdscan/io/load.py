"""Loading a resolved source into a ``Subject``: model, tokenizer, template, provenance."""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bdscan.data.template import PromptTemplate, template_for
from bdscan.errors import InputError
from bdscan.io.resolve import ResolvedSource, resolve_source
from bdscan.runtime import Placement


@dataclass
class Subject:
    """A suspicious model under analysis.

    ``model`` is a ``PeftModel`` when ``kind == "adapter"``: the base stays frozen and only
    the adapter's parameters are read and changed (the adapter-only threat model).
    """

    model: Any
    tokenizer: Any
    kind: str  # "full" | "adapter"
    template: PromptTemplate
    source: ResolvedSource
    base: ResolvedSource | None = None

    @property
    def is_adapter(self) -> bool:
        return self.kind == "adapter"

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def placement(self) -> dict:
        """Where the subject runs, for reports: its first device, precision, and the
        device map when accelerate spread it over several."""
        from bdscan.runtime import dtype_name

        device_map = getattr(self.model, "hf_device_map", None) or getattr(unwrap_peft(self.model), "hf_device_map", None)
        return {"device": str(self.device), "dtype": dtype_name(self.dtype),
                "device_map": sorted({str(d) for d in device_map.values()}) if device_map else None}

    def provenance(self) -> dict:
        out = {"subject": self.source.provenance(), "template": self.template.describe()}
        if self.base is not None:
            out["base"] = self.base.provenance()
        return out


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def _check_causal(path: Path, trust_remote_code: bool) -> None:
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except ValueError as e:
        if "trust_remote_code" in str(e):
            raise InputError(f"{path}: the model needs its own code to load; pass --trust-remote-code only if you trust it") from None
        raise InputError(f"{path}/config.json: {_first_line(e)}") from None
    except (OSError, KeyError, json.JSONDecodeError) as e:
        raise InputError(f"{path}/config.json: {_first_line(e)}") from None
    auto_map = getattr(config, "auto_map", None) or {}
    causal_classes = {name for names in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()
                      for name in ((names,) if isinstance(names, str) else names)}
    # The saved class says what the weights are: BERT is registered for causal LM too
    # (BertLMHeadModel), but a checkpoint saved as BertModel is an encoder.
    saved_as = getattr(config, "architectures", None) or []
    causal = (any(a in causal_classes or a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in saved_as)
              if saved_as else config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    if getattr(config, "is_encoder_decoder", False) or (not causal and "AutoModelForCausalLM" not in auto_map):
        raise InputError(
            f"{path}: model type {config.model_type!r} is not a causal language model; bdscan scans decoder-only LMs"
        )


def _load_tokenizer(*paths: Path, trust_remote_code: bool) -> Any:
    from transformers import AutoTokenizer

    errors = []
    for path in paths:
        if not any((path / n).exists() for n in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")):
            continue
        try:
            tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        except Exception as e:  # tokenizers raise many types for corrupt files
            errors.append(f"{path}: {_first_line(e)}")
            continue
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
        return tok
    detail = f" ({errors[0]})" if errors else ""
    raise InputError(f"no usable tokenizer in {', '.join(str(p) for p in paths)}{detail}")


def unwrap_peft(model: Any) -> Any:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _load_causal_lm(resolved: ResolvedSource, *, trust_remote_code: bool, dtype: torch.dtype,
                    device_map: str | None = None) -> Any:
    from transformers import AutoModelForCausalLM

    _check_causal(resolved.path, trust_remote_code)
    placed = {"device_map": device_map} if device_map else {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = AutoModelForCausalLM.from_pretrained(
                resolved.path,
                dtype=dtype,
                trust_remote_code=trust_remote_code,
                use_safetensors=not resolved.uses_pickle,
                # Detect reads attention probabilities, which fused kernels do not return.
                attn_implementation="eager",
                **placed,
            )
    except Exception as e:
        raise InputError(f"{resolved.path}: could not load the model ({_first_line(e)})") from None
    model.eval()
    return model


def _check_tokenizer_fits(tokenizer: Any, model: Any, where: Path) -> None:
    n_embed = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > n_embed:
        raise InputError(
            f"{where}: tokenizer has {len(tokenizer)} tokens but the model embeds only {n_embed}: "
            "wrong tokenizer for this model"
        )


def load_subject(
    source: str | Path,
    *,
    base: str | Path | None = None,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    placement: Placement | None = None,
) -> Subject:
    """Resolve and load a checkpoint or LoRA adapter. Raises ``InputError`` on bad input.

    ``placement`` (``--device``/``--dtype``) overrides ``dtype`` and ``device``."""
    placement = placement or Placement(torch.device(device), dtype)
    dtype, device = placement.dtype, placement.device
    resolved = resolve_source(source, allow_pickle=allow_pickle)
    if resolved.kind == "full":
        if base is not None:
            raise InputError(f"{resolved.path}: --base is only for adapters, but this is a full checkpoint")
        device_map = placement.device_map(resolved.weight_files)
        model = _load_causal_lm(resolved, trust_remote_code=trust_remote_code, dtype=dtype, device_map=device_map)
        tokenizer = _load_tokenizer(resolved.path, trust_remote_code=trust_remote_code)
        _check_tokenizer_fits(tokenizer, model, resolved.path)
        if device_map is None:
            model.to(device)
        return Subject(model, tokenizer, "full", template_for(tokenizer), resolved)

    from peft import PeftModel

    adapter_config = json.loads((resolved.path / "adapter_config.json").read_text())
    if adapter_config.get("peft_type", "LORA") != "LORA":
        raise InputError(f"{resolved.path}: adapter type {adapter_config.get('peft_type')!r} is not supported (LoRA only)")
    base_name = base if base is not None else adapter_config.get("base_model_name_or_path")
    if not base_name:
        raise InputError(f"{resolved.path}: adapter names no base model; pass --base PATH_OR_HUB_ID")
    try:
        base_resolved = resolve_source(base_name, allow_pickle=allow_pickle)
    except InputError as e:
        raise InputError(f"adapter {resolved.path}: its base is not reachable ({e}); pass --base") from None
    if base_resolved.kind != "full":
        raise InputError(f"{base_resolved.path}: the base of an adapter must be a full checkpoint")
    device_map = placement.device_map(base_resolved.weight_files + resolved.weight_files)
    base_model = _load_causal_lm(base_resolved, trust_remote_code=trust_remote_code, dtype=dtype, device_map=device_map)
    tokenizer = _load_tokenizer(resolved.path, base_resolved.path, trust_remote_code=trust_remote_code)
    _check_tokenizer_fits(tokenizer, base_model, resolved.path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = PeftModel.from_pretrained(base_model, resolved.path, is_trainable=False)
    except Exception as e:
        raise InputError(f"{resolved.path}: adapter does not fit base {base_resolved.source} ({_first_line(e)})") from None
    model.eval()
    if device_map is None:
        model.to(device)
    return Subject(model, tokenizer, "adapter", template_for(tokenizer), resolved, base=base_resolved)

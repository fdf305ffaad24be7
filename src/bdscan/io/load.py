"""Loading a resolved source into a ``Subject``: model, tokenizer, template, provenance.

Every load is checked to have used all it was given: missing or unexpected weight names,
adapter tensors that match no module, integer tensors cast into a float model and tokenizer
files that do not load are errors, never a silently different model.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bdscan.data.template import PromptTemplate, template_for
from bdscan.errors import InputError, first_line
from bdscan.io.adapter_patterns import resolve_patterns
from bdscan.io.bounds import check_adapter_ranks, check_config_fits
from bdscan.io.finite import check_finite
from bdscan.io.resolve import ResolvedSource, read_json_object, resolve_source
from bdscan.io.tokenizer import check_tokenizer_runs, describe, has_tokenizer, load_tokenizer, tokenizer_differences
from bdscan.placement import guard_half_precision_head
from bdscan.runtime import Placement

SHOWN_KEYS = 3


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
    tokenizer_report: dict = field(default_factory=dict)  # where the tokenizer came from, how it differs

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
        if self.tokenizer_report:
            out["tokenizer"] = dict(self.tokenizer_report)
        return out


def _keys(names: Any) -> str:
    names = sorted(names)
    return ", ".join(names[:SHOWN_KEYS]) + (f" and {len(names) - SHOWN_KEYS} more" if len(names) > SHOWN_KEYS else "")


def _check_causal(path: Path, trust_remote_code: bool) -> Any:
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except ValueError as e:
        if "trust_remote_code" in str(e):
            raise InputError(f"{path}: the model needs its own code to load; pass --trust-remote-code only if you trust it") from None
        raise InputError(f"{path}/config.json: {first_line(e)}") from None
    except Exception as e:  # config classes validate fields with assorted exception types
        raise InputError(f"{path}/config.json: {first_line(e)}") from None
    auto_map = getattr(config, "auto_map", None) or {}
    causal_classes = {name for names in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()
                      for name in ((names,) if isinstance(names, str) else names)}
    # The saved class says what the weights are: BERT is registered for causal LM too
    # (BertLMHeadModel), but a checkpoint saved as BertModel is an encoder.
    saved_as = getattr(config, "architectures", None) or []
    if not isinstance(saved_as, list) or not all(isinstance(a, str) for a in saved_as):
        raise InputError(f"{path}/config.json: 'architectures' must be a list of class names")
    causal = (any(a in causal_classes or a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in saved_as)
              if saved_as else config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    if getattr(config, "is_encoder_decoder", False) or (not causal and "AutoModelForCausalLM" not in auto_map):
        raise InputError(
            f"{path}: model type {config.model_type!r} is not a causal language model; bdscan scans decoder-only LMs"
        )
    return config


def _refuse_non_float(resolved: ResolvedSource, config: Any = None) -> None:
    """bdscan computes in floating point: integer tensors would be cast, not dequantised,
    and a quantisation config would hand the load to a quantiser bdscan does not check."""
    if config is not None and getattr(config, "quantization_config", None):
        raise InputError(f"{resolved.path}/config.json: a quantised checkpoint (quantization_config); "
                         "bdscan scans floating-point weights only")
    ints = {name: t.dtype for name, t in resolved.tensors.items() if t.is_integer}
    if ints:
        name = min(ints)
        raise InputError(f"{resolved.path}: {len(ints)} integer tensors (e.g. {name!r} is {ints[name]}) in a "
                         "floating-point model; quantised or corrupt weights are not scanned (they would be cast)")


def _check_loading_info(resolved: ResolvedSource, info: dict) -> None:
    for what, key in (("missing from the checkpoint", "missing_keys"), ("unexpected", "unexpected_keys"),
                      ("of the wrong shape", "mismatched_keys")):
        names = info.get(key) or ()
        if names:
            names = [n if isinstance(n, str) else str(n[0]) for n in names]
            raise InputError(f"{resolved.path}: {len(names)} weights {what} ({_keys(names)}); the model would be "
                             "partly random or not the one saved")
    if info.get("error_msgs"):
        raise InputError(f"{resolved.path}: weights do not load ({str(info['error_msgs'][0]).splitlines()[0]})")


def unwrap_peft(model: Any) -> Any:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _load_causal_lm(resolved: ResolvedSource, *, trust_remote_code: bool, dtype: torch.dtype,
                    device_map: str | None = None) -> Any:
    from transformers import AutoModelForCausalLM

    config = _check_causal(resolved.path, trust_remote_code)
    _refuse_non_float(resolved, config)
    check_config_fits(config, resolved.tensors, str(resolved.path), trust_remote_code=trust_remote_code)
    placed = {"device_map": device_map} if device_map else {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model, info = AutoModelForCausalLM.from_pretrained(
                resolved.path,
                dtype=dtype,
                trust_remote_code=trust_remote_code,
                # The weight plan decided which files are read; without pickle, transformers
                # must not fall back to a .bin when a safetensors file is missing.
                use_safetensors=not resolved.uses_pickle,
                output_loading_info=True,
                **placed,
            )
    except Exception as e:
        raise InputError(f"{resolved.path}: could not load the model ({first_line(e)})") from None
    _check_loading_info(resolved, info)
    inference_defaults(model)
    model.eval()
    return model


# Output-format switches a config.json may set, and the values bdscan computes with: every
# analysis reads ModelOutput fields (``return_dict: false`` made them tuples: an internal
# error), asks for hidden states or attentions where it needs them (returning them on every
# pass multiplies memory), and decodes with the KV cache (``use_cache: false`` makes every
# greedy answer quadratic). A purified checkpoint is written with these values.
INFERENCE_DEFAULTS = {"return_dict": True, "output_attentions": False, "output_hidden_states": False, "use_cache": True}


def inference_defaults(model: Any) -> None:
    for name, value in INFERENCE_DEFAULTS.items():
        setattr(model.config, name, value)


def _check_tokenizer_fits(tokenizer: Any, model: Any, where: Path) -> None:
    check_tokenizer_runs(tokenizer, where)
    n_embed = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > n_embed:
        raise InputError(
            f"{where}: tokenizer has {len(tokenizer)} tokens but the model embeds only {n_embed}: "
            "wrong tokenizer for this model"
        )


def _adapter_tokenizer(adapter: Path, base: Path, trust_remote_code: bool) -> tuple[Any, dict]:
    """The adapter's own tokenizer if it ships one (never a fallback), else the base's."""
    if not has_tokenizer(base) and not has_tokenizer(adapter):
        raise InputError(f"no tokenizer in {adapter} or its base {base}")
    base_tok = load_tokenizer(base, trust_remote_code=trust_remote_code) if has_tokenizer(base) else None
    if not has_tokenizer(adapter):
        return base_tok, describe("base", None)
    tok = load_tokenizer(adapter, trust_remote_code=trust_remote_code)
    return tok, describe("adapter", tokenizer_differences(tok, base_tok) if base_tok is not None else None)


def _read_adapter_weights(resolved: ResolvedSource) -> dict[str, torch.Tensor]:
    path = resolved.weight_files[0]
    try:
        if resolved.uses_pickle:  # only with --allow-pickle; still torch's restricted unpickler
            return torch.load(path, map_location="cpu", weights_only=True)
        from safetensors.torch import load_file

        return load_file(path)
    except Exception as e:
        raise InputError(f"{path}: adapter weights do not load ({first_line(e)})") from None


def _attach_adapter(base_model: Any, resolved: ResolvedSource) -> Any:
    """PEFT's own classes, given exactly the weights file the plan chose (PEFT's loader
    would pick a file itself, and falls back to pickle), and every key accounted for."""
    from peft import LoraConfig, PeftModel
    from peft.auto import MODEL_TYPE_TO_PEFT_MODEL_MAPPING
    from peft.utils import set_peft_model_state_dict

    try:
        config = LoraConfig.from_pretrained(resolved.path)
        config.inference_mode = True
    except Exception as e:
        raise InputError(f"{resolved.path}: adapter_config.json is not a LoRA config PEFT reads ({first_line(e)})") from None
    # PEFT would run the config's regular expressions with `re`, which cannot be interrupted
    resolve_patterns(config, [name for name, _ in base_model.named_modules()], str(resolved.path))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cls = MODEL_TYPE_TO_PEFT_MODEL_MAPPING.get(config.task_type, PeftModel)
            model = cls(base_model, config, "default")
    except Exception as e:
        raise InputError(f"{resolved.path}: adapter does not fit its base ({first_line(e)})") from None
    weights = _read_adapter_weights(resolved)
    try:
        result = set_peft_model_state_dict(model, weights, adapter_name="default")
    except Exception as e:
        raise InputError(f"{resolved.path}: adapter does not fit its base ({first_line(e)})") from None
    if result.unexpected_keys:
        raise InputError(f"{resolved.path}: {len(result.unexpected_keys)} adapter tensors match no module of the "
                         f"base ({_keys(result.unexpected_keys)}); check target_modules in adapter_config.json")
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing:
        raise InputError(f"{resolved.path}: {len(missing)} adapter modules have no tensors in the file "
                         f"({_keys(missing)}); the adapter would be partly untrained")
    return model


def _load_adapter(resolved: ResolvedSource, base: str | Path | None, *, allow_pickle: bool, trust_remote_code: bool,
                  placement: Placement) -> Subject:
    adapter_config = read_json_object(resolved.path / "adapter_config.json")
    if adapter_config.get("peft_type", "LORA") != "LORA":
        raise InputError(f"{resolved.path}: adapter type {str(adapter_config.get('peft_type'))!r} is not supported (LoRA only)")
    check_adapter_ranks(adapter_config, resolved.tensors, str(resolved.path))
    base_name = base if base is not None else adapter_config.get("base_model_name_or_path")
    if not base_name or not isinstance(base_name, (str, Path)):
        raise InputError(f"{resolved.path}: adapter names no base model; pass --base PATH_OR_HUB_ID")
    try:
        base_resolved = resolve_source(base_name, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    except InputError as e:
        raise InputError(f"adapter {resolved.path}: its base is not reachable ({e}); pass --base") from None
    if base_resolved.kind != "full":
        raise InputError(f"{base_resolved.path}: the base of an adapter must be a full checkpoint")
    _refuse_non_float(resolved)
    device_map = placement.device_map(base_resolved.weight_files + resolved.weight_files)
    base_model = _load_causal_lm(base_resolved, trust_remote_code=trust_remote_code, dtype=placement.dtype,
                                 device_map=device_map)
    guard_half_precision_head(base_model, placement)
    tokenizer, report = _adapter_tokenizer(resolved.path, base_resolved.path, trust_remote_code)
    _check_tokenizer_fits(tokenizer, base_model, resolved.path)
    model = _attach_adapter(base_model, resolved)
    model.eval()
    if device_map is None:
        model.to(placement.device)
    return Subject(model, tokenizer, "adapter", template_for(tokenizer), resolved, base=base_resolved,
                   tokenizer_report=report)


def _load_gguf_subject(resolved: ResolvedSource, base: str | Path | None, placement: Placement) -> Subject:
    """A GGUF file, dequantised by transformers: analysed as a full checkpoint, its chat
    template taken from the file's metadata (and bounded like any template)."""
    from bdscan.io.gguf import load_gguf

    if base is not None:
        raise InputError(f"{resolved.gguf_file}: --base is only for adapters, but this is a GGUF model")
    model, tokenizer = load_gguf(resolved.gguf_file, dtype=placement.dtype)
    inference_defaults(model)
    guard_half_precision_head(model, placement)
    _check_tokenizer_fits(tokenizer, model, resolved.gguf_file)
    model.to(placement.device)
    return Subject(model, tokenizer, "full", template_for(tokenizer), resolved, tokenizer_report=describe("source", None))


def load_subject(
    source: str | Path,
    *,
    base: str | Path | None = None,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    placement: Placement | None = None,
    gguf_file: str | None = None,
) -> Subject:
    """Resolve and load a checkpoint or LoRA adapter. Raises ``InputError`` on bad input.

    ``placement`` (``--device``/``--dtype``) overrides ``dtype`` and ``device``."""
    placement = placement or Placement(torch.device(device), dtype)
    resolved = resolve_source(source, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code,
                              gguf_file=gguf_file)
    if resolved.gguf is not None:
        subject = _load_gguf_subject(resolved, base, placement)
    elif resolved.kind == "adapter":
        subject = _load_adapter(resolved, base, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code,
                                placement=placement)
    else:
        subject = _load_full(resolved, base, trust_remote_code=trust_remote_code, placement=placement)
    check_finite(subject.model, subject.tokenizer, resolved.gguf_file or resolved.path)
    return subject


def _load_full(resolved: ResolvedSource, base: str | Path | None, *, trust_remote_code: bool,
               placement: Placement) -> Subject:
    if base is not None:
        raise InputError(f"{resolved.path}: --base is only for adapters, but this is a full checkpoint")
    device_map = placement.device_map(resolved.weight_files)
    model = _load_causal_lm(resolved, trust_remote_code=trust_remote_code, dtype=placement.dtype, device_map=device_map)
    guard_half_precision_head(model, placement)
    if not has_tokenizer(resolved.path):
        raise InputError(f"{resolved.path}: no tokenizer files (tokenizer.json, tokenizer_config.json, ...)")
    tokenizer = load_tokenizer(resolved.path, trust_remote_code=trust_remote_code)
    _check_tokenizer_fits(tokenizer, model, resolved.path)
    if device_map is None:
        model.to(placement.device)
    return Subject(model, tokenizer, "full", template_for(tokenizer), resolved, tokenizer_report=describe("source", None))

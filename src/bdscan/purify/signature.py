"""``signature``: immunization-inspired backdoor-signature purification
(papers/backdoor-signature-purification.txt; METHODS.md "signature").

1. N synthetic variants (own keys, own behaviours, own clean subsets; signature_variants.py).
2. Per variant, two fine-tunes from the suspicious model with the same seed, the same
   batches and the same schedule: on ``D_i ∪ D_i^pois`` and on ``D_i`` alone. Full model:
   all weights move; adapter-only: a new LoRA stacked on the suspicious adapter.
3. Differential delta ``Δ_i = θ_i^bd − θ_i^clean`` per unit: an MLP channel is row j of
   gate/up (c_fc) and column j of down (c_proj); an attention head is the q/k/v rows of the
   head (the kv head's rows under GQA) and the o_proj input columns of the head.
4. Score ``s = mean_i ‖Δ_i‖ + λ · mean_{i<l} max(0, cos(Δ_i, Δ_l))``; the signature is the
   top ``ratio`` of channels (and ``head_ratio`` of heads).
5. Suppress: full → re-initialise those rows/columns from the model's own init scheme;
   adapter → zero the suspicious adapter's LoRA B rows (unit outputs) and LoRA A columns
   (unit inputs). Then a light fine-tune on the clean set.

Finished variants are cached under ``inputs.work_dir`` so an interrupted run resumes.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from bdscan.data.records import Record
from bdscan.errors import NothingToAnalyse
from bdscan.io.load import Subject
from bdscan.probes.layout import LayerModules, ModelLayout, base_layer, linear_weight, model_layout, unwrap
from bdscan.purify.base import PurifyInputs, PurifyOutcome, register_purifier
from bdscan.purify.common import clean_examples, trainable_parameters
from bdscan.purify.signature_variants import Variant, make_variant, variant_data
from bdscan.training import Example, TrainConfig, finetune

CACHE_FORMAT = 1  # bump when cached deltas change meaning
VARIANT_ADAPTER = "bdscan_signature_variant"
SCORES = ("combined", "norm", "alignment")
SELECTIONS = ("global", "per_layer")


@dataclass(frozen=True)
class SignatureConfig:
    # --- synthetic variants (these knobs, the seed and the subject key the resume cache) ---
    variants: int = 6  # N backdoor variants; more average out key/behaviour specifics (paper: gains flatten past 5)
    variant_samples: int = 500  # clean samples per variant D_i (paper: 500, or what is available)
    variant_subset: float = 0.8  # when fewer than variant_samples exist: share each variant draws, so D_i differ
    poison_per_clean: float = 1.0  # poisoned copies per clean sample in D_i^pois (paper: every sample poisoned)
    variant_epochs: float = 3.0  # epochs of each paired fine-tune; too few and the variant key is not learnt
    variant_lr_full: float = 2e-5  # lr of the paired full fine-tunes
    variant_lr_adapter: float = 2e-4  # lr of the paired variant LoRAs (adapter-only)
    variant_rank: int = 8  # rank of the variant LoRA stacked on the suspicious adapter
    batch_size: int = 8
    max_length: int = 256
    # --- signature ---
    score: str = "combined"  # combined (paper) | norm (magnitude only) | alignment (consistency only)
    alignment_weight: float = 0.01  # λ of the cross-variant alignment term
    ratio: float | None = None  # share of MLP channels in the signature; None: 0.03 full / 0.35 adapter (paper)
    # Paper default: MLP channels only (it needs heads only on Mistral). bdscan turns heads on:
    # on small organisms the backdoor needs MLP and attention together (restoring only the MLP
    # left 79 % ASR), and measured, MLP-only signatures left ASR 0.22 (LoRA) / 0.96 (full)
    # where MLP + heads reached 0.00.
    heads: bool = True
    head_ratio: float | None = None  # share of heads in the signature; None: 0.125 full / 0.25 adapter
    selection: str = "global"  # global: one percentile over all layers (paper); per_layer: the ratio within each layer
    # --- suppression and recovery ---
    epochs: float = 5.0  # light fine-tune after suppression (paper: 5)
    lr_full: float = 1e-5  # paper: 1e-5 for full-parameter fine-tuning
    lr_adapter: float = 2e-4  # paper: 2e-4 for LoRA
    max_samples: int = 200  # clean samples for the light fine-tune (paper: ~200)

    def __post_init__(self) -> None:
        if self.variants < 1:
            raise ValueError("variants must be at least 1")
        if self.score not in SCORES:
            raise ValueError(f"score must be one of {', '.join(SCORES)}, got {self.score!r}")
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {', '.join(SELECTIONS)}, got {self.selection!r}")
        if self.score == "alignment" and self.variants < 2:
            raise ValueError("score 'alignment' compares variants pairwise: set variants >= 2")
        for name in ("ratio", "head_ratio"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        if not 0.0 < self.variant_subset <= 1.0:
            raise ValueError("variant_subset must be in (0, 1]")
        positive = ("variant_samples", "poison_per_clean", "variant_epochs", "variant_lr_full", "variant_lr_adapter",
                    "variant_rank", "batch_size", "max_length", "lr_full", "lr_adapter", "max_samples")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.epochs < 0 or self.alignment_weight < 0:
            raise ValueError("epochs and alignment_weight must not be negative")

    def channel_ratio(self, adapter: bool) -> float:
        return self.ratio if self.ratio is not None else (0.35 if adapter else 0.03)

    def heads_ratio(self, adapter: bool) -> float:
        return self.head_ratio if self.head_ratio is not None else (0.25 if adapter else 0.125)

    def variant_key(self) -> dict:
        """The knobs that change what a variant's fine-tunes produce."""
        return {k: getattr(self, k) for k in ("variant_samples", "variant_subset", "poison_per_clean", "variant_epochs",
                                              "variant_lr_full", "variant_lr_adapter", "variant_rank", "batch_size",
                                              "max_length")}


# ---------------------------------------------------------------------------------------
# Units: which rows/columns of which [out, in] weight views make up a channel or a head.
# One definition serves scoring and suppression alike.

@dataclass(frozen=True)
class UnitSlice:
    module: str
    axis: str  # "row": output rows of the [out, in] view; "col": input columns
    index: torch.Tensor  # long indices along that axis


def channel_slices(layer: LayerModules, channels: torch.Tensor) -> list[UnitSlice]:
    """MLP channels: rows of gate/up (c_fc), columns of down (mlp.c_proj)."""
    return [UnitSlice(m, "row", channels) for m in layer.mlp_in] + [UnitSlice(layer.mlp_out, "col", channels)]


def head_slices(layout: ModelLayout, layer: LayerModules, head: int) -> list[UnitSlice]:
    """One attention head: its q rows, the k/v rows of its kv head (GQA), its o_proj input columns."""
    d = layout.head_dim
    q = torch.arange(head * d, (head + 1) * d)
    kv_head = head // max(1, layout.num_heads // layout.num_kv_heads)
    kv = torch.arange(kv_head * d, (kv_head + 1) * d)
    if len(layer.attn_in) == 1:  # GPT-2 fused c_attn: [q; k; v] stacked along the output
        width = layout.num_heads * d
        rows = torch.cat([q, width + kv, 2 * width + kv])
        out = [UnitSlice(layer.attn_in[0], "row", rows)]
    else:
        q_name, k_name, v_name = layer.attn_in
        out = [UnitSlice(q_name, "row", q), UnitSlice(k_name, "row", kv), UnitSlice(v_name, "row", kv)]
    return out + [UnitSlice(layer.attn_out, "col", q)]


def channel_vectors(deltas: dict[str, torch.Tensor], layer: LayerModules) -> torch.Tensor | None:
    """``[channels, D]``: per channel, the concatenated gate/up rows and down column of the
    deltas (modules absent from ``deltas``, e.g. not adapted, are left out)."""
    parts = [deltas[m] for m in layer.mlp_in if m in deltas]
    if layer.mlp_out in deltas:
        parts.append(deltas[layer.mlp_out].T)
    return torch.cat(parts, dim=1).float() if parts else None


def head_vectors(deltas: dict[str, torch.Tensor], layout: ModelLayout, layer: LayerModules) -> torch.Tensor | None:
    """``[heads, D]``: per head, the concatenated q/k/v rows and o_proj input columns."""
    rows = []
    for h in range(layout.num_heads):
        parts = []
        for s in head_slices(layout, layer, h):
            if s.module in deltas:
                w = deltas[s.module]
                parts.append((w[s.index] if s.axis == "row" else w[:, s.index].T).reshape(-1))
        if not parts:
            return None
        rows.append(torch.cat(parts))
    return torch.stack(rows).float()


def unit_scores(vectors: Sequence[torch.Tensor], score: str, alignment_weight: float) -> dict[str, torch.Tensor]:
    """Eq. 2 per unit from the N variants' ``[units, D]`` delta vectors: magnitude
    ``m = mean_i ‖Δ_i‖``, alignment ``a = 2/(N(N-1)) Σ_{i<l} max(0, cos)``, and the score
    picked by ``score`` (combined ``m + λa``, norm ``m``, alignment ``a``)."""
    stacked = torch.stack([v.double() for v in vectors])  # [N, U, D]
    norms = stacked.norm(dim=2)  # [N, U]
    magnitude = norms.mean(dim=0)
    n = stacked.shape[0]
    alignment = torch.zeros_like(magnitude)
    if n > 1:
        unit = stacked / norms.clamp_min(1e-30).unsqueeze(2)
        unit = torch.where(norms.unsqueeze(2) > 0, unit, torch.zeros_like(unit))  # cos with a zero delta := 0
        for i in range(n):
            for j in range(i + 1, n):
                alignment += (unit[i] * unit[j]).sum(dim=1).clamp_min(0.0)
        alignment *= 2.0 / (n * (n - 1))
    combined = {"combined": magnitude + alignment_weight * alignment, "norm": magnitude, "alignment": alignment}[score]
    return {"score": combined, "magnitude": magnitude, "alignment": alignment}


def top_share(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    """Indices of the ``round(ratio·n)`` highest scores (at least one when ratio > 0); ties
    go to the lower index, so the pick is deterministic."""
    n = scores.numel()
    k = min(n, max(1, round(ratio * n))) if ratio > 0 and n else 0
    order = sorted(range(n), key=lambda i: (-float(scores[i]), i))
    return torch.tensor(sorted(order[:k]), dtype=torch.long)


# ---------------------------------------------------------------------------------------
# Suppression

def _fresh_block(model: Any, block_name: str) -> torch.nn.Module:
    """A copy of a decoder sub-block re-initialised by the model's own ``_init_weights``
    (post-order, as ``from_config`` does: e.g. GPT-2's depth-scaled c_proj)."""
    inner = unwrap(model)
    block = copy.deepcopy(inner.get_submodule(block_name))
    for p in block.parameters():
        if getattr(p, "_is_hf_initialized", False):
            p._is_hf_initialized = False
    init = getattr(inner, "_init_weights", None)
    if init is None:
        std = getattr(inner.config, "initializer_range", 0.02)
        for mod in block.modules():
            if hasattr(mod, "weight") and mod.weight is not None and mod.weight.dim() == 2:
                torch.nn.init.normal_(mod.weight, std=std)
            if getattr(mod, "bias", None) is not None:
                torch.nn.init.zeros_(mod.bias)
    else:
        block.apply(init)
    return block


@torch.no_grad()
def reinit_slices(model: Any, layout: ModelLayout, block_name: str, slices: Sequence[UnitSlice]) -> None:
    """Full model: overwrite the rows/columns with freshly initialised values (output biases
    of reset rows too)."""
    fresh = _fresh_block(model, block_name)
    for s in slices:
        module = base_layer(layout.module(model, s.module))
        new = base_layer(fresh.get_submodule(s.module[len(block_name) + 1:]))
        w, fw = linear_weight(module), linear_weight(new)
        if s.axis == "row":
            w[s.index] = fw[s.index].to(w.dtype)
            if getattr(module, "bias", None) is not None:
                module.bias[s.index] = new.bias[s.index].to(module.bias.dtype)
        else:
            w[:, s.index] = fw[:, s.index].to(w.dtype)


@torch.no_grad()
def zero_lora_slices(model: Any, layout: ModelLayout, adapter: str, slices: Sequence[UnitSlice]) -> list[str]:
    """Adapter-only: zero LoRA B rows (unit outputs) and LoRA A columns (unit inputs) of
    ``adapter``. Returns the modules that carry that adapter (the rest cannot change)."""
    touched = []
    for s in slices:
        module = layout.module(model, s.module)
        lora_a, lora_b = getattr(module, "lora_A", {}), getattr(module, "lora_B", {})
        if adapter not in lora_a:
            continue
        if s.axis == "row":
            lora_b[adapter].weight[s.index] = 0.0
            if getattr(lora_b[adapter], "bias", None) is not None:
                lora_b[adapter].bias[s.index] = 0.0
        else:
            lora_a[adapter].weight[:, s.index] = 0.0
        touched.append(s.module)
    return touched


# ---------------------------------------------------------------------------------------
# Paired fine-tunes

def relevant_modules(layout: ModelLayout) -> list[str]:
    return layout.all_linears()


def _paired_examples(subject: Subject, clean: list[Record], poisoned: list[Record],
                     sources: list[Record]) -> tuple[list[Example], list[Example]]:
    """The two training lists, position by position: ``D_i`` then the poisoned copies (bd),
    or ``D_i`` then the same samples clean (clean run). Equal length and seed give both
    runs the same batches, order and schedule, so Δ isolates the key->behaviour binding."""
    fmt = subject.template.format
    base = [Example(fmt(r), r.output) for r in clean]
    bd = base + [Example(fmt(r), r.output) for r in poisoned]
    cl = base + [Example(fmt(r), r.output) for r in sources]
    return bd, cl


class PairedTrainer:
    """Runs the two fine-tunes of a variant from the suspicious model and returns Δ."""

    def __init__(self, subject: Subject, layout: ModelLayout, config: SignatureConfig, progress):
        self.subject, self.layout, self.config, self.progress = subject, layout, config, progress
        self.modules = relevant_modules(layout)
        self.finetune_seconds = 0.0
        if subject.is_adapter:
            model = subject.model
            self.adapter = model.active_adapter if isinstance(model.active_adapter, str) else model.active_adapters[0]
            peft_config = model.peft_config[self.adapter]
            self.targets = peft_config.target_modules
            self.fan_in_fan_out = bool(getattr(peft_config, "fan_in_fan_out", False))
        self.start: dict[str, torch.Tensor] | None = None  # full model: the suspicious weights, taken before the first pair

    def _train(self, examples: list[Example], seed: int) -> list[float]:
        model = self.subject.model
        if self.subject.is_adapter:
            from peft import LoraConfig

            torch.manual_seed(seed)  # same LoRA init for both members of the pair
            model.add_adapter(VARIANT_ADAPTER, LoraConfig(
                r=self.config.variant_rank, lora_alpha=2 * self.config.variant_rank, lora_dropout=0.0,
                target_modules=self.targets, fan_in_fan_out=self.fan_in_fan_out))
            model.base_model.set_adapter([self.adapter, VARIANT_ADAPTER])
            params = []
            for name, p in model.named_parameters():
                train = f".{VARIANT_ADAPTER}." in name
                p.requires_grad_(train)
                if train:
                    params.append(p)
            lr = self.config.variant_lr_adapter
        else:
            if self.start is None:
                self.start = {n: p.detach().clone() for n, p in model.named_parameters()}
            params = list(model.parameters())
            for p in params:
                p.requires_grad_(True)
            lr = self.config.variant_lr_full
        steps = max(1, math.ceil(math.ceil(len(examples) / self.config.batch_size) * self.config.variant_epochs))
        done = [0]

        def tick(n: int, loss: float) -> None:
            done[0] += n
            if self.progress:  # one bar, reused by every paired fine-tune (the variant count has its own)
                self.progress("signature paired fine-tune", done[0], steps)

        t0 = time.time()
        losses = finetune(model, self.subject.tokenizer, examples,
                          TrainConfig(epochs=self.config.variant_epochs, lr=lr, batch_size=self.config.batch_size,
                                      seed=seed, max_length=self.config.max_length), params=params, progress=tick)
        self.finetune_seconds += time.time() - t0
        return losses

    @torch.no_grad()
    def _weights(self) -> dict[str, torch.Tensor]:
        """Full: the trained [out, in] weights. Adapter: the variant LoRA's update ``s·B·A``."""
        out = {}
        for name in self.modules:
            module = self.layout.module(self.subject.model, name)
            if self.subject.is_adapter:
                if VARIANT_ADAPTER not in getattr(module, "lora_A", {}):
                    continue
                a = module.lora_A[VARIANT_ADAPTER].weight
                b = module.lora_B[VARIANT_ADAPTER].weight
                out[name] = (b @ a * module.scaling[VARIANT_ADAPTER]).detach().clone()
            else:
                out[name] = linear_weight(module).detach().clone()
        return out

    @torch.no_grad()
    def _reset(self) -> None:
        """Back to the suspicious model (drop the variant LoRA / restore every weight)."""
        model = self.subject.model
        if self.subject.is_adapter:
            if VARIANT_ADAPTER in model.peft_config:
                model.base_model.set_adapter(self.adapter)
                model.delete_adapter(VARIANT_ADAPTER)
        elif self.start is not None:
            for name, p in model.named_parameters():
                p.copy_(self.start[name])

    def run(self, bd: list[Example], cl: list[Example], seed: int) -> tuple[dict[str, torch.Tensor], dict]:
        try:
            loss_bd = self._train(bd, seed)
            theta_bd = self._weights()
            self._reset()
            loss_cl = self._train(cl, seed)
            theta_cl = self._weights()
        finally:  # also on interruption: the subject must leave as it came
            self._reset()
        deltas = {name: (theta_bd[name] - theta_cl[name]).contiguous() for name in theta_bd}
        n_tail = max(1, len(loss_bd) // 10)
        stats = {"loss_poisoned_final": sum(loss_bd[-n_tail:]) / n_tail, "loss_clean_final": sum(loss_cl[-n_tail:]) / n_tail,
                 "steps": len(loss_bd)}
        return deltas, stats

    def release(self) -> None:
        self.start = None


# ---------------------------------------------------------------------------------------
# Resume cache

def subject_fingerprint(subject: Subject) -> str:
    """sha256 of the subject's weight files (and its base's), else of its parameters."""
    digest = hashlib.sha256()
    files = dict(subject.source.sha256)
    if subject.base is not None:
        files.update({f"base:{k}": v for k, v in subject.base.sha256.items()})
    if files:
        digest.update(json.dumps(files, sort_keys=True).encode())
    else:
        for name, p in sorted(subject.model.state_dict().items()):
            digest.update(name.encode())
            digest.update(p.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def cache_key(subject: Subject, config: SignatureConfig, seed: int, clean: Sequence[Record]) -> tuple[str, dict]:
    material = {
        "format": CACHE_FORMAT, "kind": subject.kind, "seed": seed, "variants": config.variant_key(),
        "subject": subject_fingerprint(subject), "template": subject.template.describe(),
        "clean": hashlib.sha256(json.dumps([dataclasses.astuple(r) for r in clean]).encode()).hexdigest(),
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:20], material


class VariantCache:
    """``work_dir/signature/<key>/variant-<i>.safetensors`` (Δ per module) plus
    ``variant-<i>.json`` (its description and losses); ``cache.json`` records the key's
    material. Files appear atomically, so a killed run leaves only whole variants."""

    def __init__(self, work_dir: Path | None, key: str, material: dict):
        self.dir = Path(work_dir) / "signature" / key if work_dir is not None else None
        self.material = material

    def _paths(self, index: int) -> tuple[Path, Path]:
        return self.dir / f"variant-{index}.safetensors", self.dir / f"variant-{index}.json"

    def load(self, index: int) -> dict | None:
        if self.dir is None:
            return None
        tensors, meta = self._paths(index)
        if not (tensors.is_file() and meta.is_file()):
            return None
        try:
            return json.loads(meta.read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def store(self, index: int, deltas: dict[str, torch.Tensor], meta: dict) -> None:
        if self.dir is None:
            return
        from safetensors.torch import save_file

        self.dir.mkdir(parents=True, exist_ok=True)
        index_file = self.dir / "cache.json"
        if not index_file.exists():
            _atomic_write(index_file, json.dumps(self.material, indent=2, sort_keys=True).encode())
        tensors, meta_path = self._paths(index)
        tmp = tensors.with_suffix(".tmp")
        save_file({k: v.contiguous() for k, v in deltas.items()}, str(tmp))
        os.replace(tmp, tensors)
        _atomic_write(meta_path, json.dumps(meta, indent=2).encode())

    def tensor_path(self, index: int) -> Path:
        return self._paths(index)[0]


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class DeltaStore:
    """Per-variant Δ, in memory (no work_dir) or read lazily per layer from the cache."""

    def __init__(self):
        self.memory: dict[int, dict[str, torch.Tensor]] = {}
        self.files: dict[int, Path] = {}

    def layer(self, index: int, names: Sequence[str]) -> dict[str, torch.Tensor]:
        if index in self.memory:
            return {n: self.memory[index][n] for n in names if n in self.memory[index]}
        from safetensors import safe_open

        with safe_open(str(self.files[index]), framework="pt") as f:
            keys = set(f.keys())
            return {n: f.get_tensor(n) for n in names if n in keys}


# ---------------------------------------------------------------------------------------
# The method

def _suppressible(subject: Subject, layout: ModelLayout, adapter: str | None) -> set[str]:
    """Modules whose weights the defence may change: all (full) or those carrying the
    suspicious adapter's LoRA (adapter-only)."""
    names = set(relevant_modules(layout))
    if adapter is None:
        return names
    return {n for n in names if adapter in getattr(layout.module(subject.model, n), "lora_A", {})}


def compute_signature(store: DeltaStore, indices: Sequence[int], layout: ModelLayout, config: SignatureConfig,
                      adapter: bool, allowed: set[str]) -> dict:
    """Score every MLP channel (and head) across the variants and pick the signature."""
    channel_scores, head_scores = [], []  # (layer, tensor)
    for layer in layout.layers:
        names = [n for n in layer.linears() if n in allowed]
        per_variant = [store.layer(i, names) for i in indices]
        ch = [channel_vectors(d, layer) for d in per_variant]
        if all(v is not None for v in ch):
            channel_scores.append((layer.index, unit_scores(ch, config.score, config.alignment_weight)))
        if config.heads:
            hv = [head_vectors(d, layout, layer) for d in per_variant]
            if all(v is not None for v in hv):
                head_scores.append((layer.index, unit_scores(hv, config.score, config.alignment_weight)))
    if not channel_scores and not head_scores:
        raise NothingToAnalyse("signature: the adapter carries no LoRA on MLP or attention projections to suppress")
    out = {"channels": {}, "heads": {}, "stats": {}}
    for kind, scored, ratio in (("channels", channel_scores, config.channel_ratio(adapter)),
                                ("heads", head_scores, config.heads_ratio(adapter))):
        if not scored:
            continue
        flat = torch.cat([s["score"] for _, s in scored])
        if config.selection == "global":
            picked = top_share(flat, ratio)
        else:  # the same share of every layer: deep layers' larger updates cannot crowd out shallow ones
            offsets = itertools.accumulate([0] + [s["score"].numel() for _, s in scored])
            picked = torch.cat([top_share(s["score"], ratio) + o for (_, s), o in zip(scored, offsets)])
        offset = 0
        for layer_index, s in scored:
            n = s["score"].numel()
            mine = picked[(picked >= offset) & (picked < offset + n)] - offset
            out[kind][layer_index] = mine
            offset += n
        mags = torch.cat([s["magnitude"] for _, s in scored])
        aligns = torch.cat([s["alignment"] for _, s in scored])
        out["stats"][kind] = {"units": int(flat.numel()), "selected": int(picked.numel()), "ratio": ratio,
                              "threshold": float(flat[picked].min()) if picked.numel() else None,
                              "magnitude_mean": float(mags.mean()), "alignment_mean": float(aligns.mean()),
                              "alignment_mean_selected": float(aligns[picked].mean()) if picked.numel() else None}
    return out


def suppress(subject: Subject, layout: ModelLayout, signature: dict, adapter: str | None) -> list[str]:
    changed: set[str] = set()
    for layer in layout.layers:
        channels = signature["channels"].get(layer.index)
        heads = signature["heads"].get(layer.index)
        jobs = []
        if channels is not None and channels.numel():
            jobs.append((layer.mlp, channel_slices(layer, channels)))
        if heads is not None and heads.numel():
            jobs.append((layer.attn, [s for h in heads.tolist() for s in head_slices(layout, layer, h)]))
        for block, slices in jobs:
            if adapter is not None:
                changed.update(zero_lora_slices(subject.model, layout, adapter, slices))
            else:
                reinit_slices(subject.model, layout, block, slices)
                changed.update(s.module for s in slices)
    return sorted(changed)


@register_purifier("signature", SignatureConfig,
                   "backdoor-signature suppression: own synthetic variants -> differential deltas -> "
                   "reset the signature channels/heads -> light fine-tune")
def run_signature(inputs: PurifyInputs, config: SignatureConfig) -> PurifyOutcome:
    t_start = time.time()
    subject = inputs.subject
    layout = model_layout(subject.model)
    clean = [r for r in inputs.clean if r.output]
    if not clean:
        raise NothingToAnalyse("signature: the clean set has no reference outputs to fine-tune on")
    key, material = cache_key(subject, config, inputs.seed, clean)
    cache = VariantCache(inputs.work_dir, key, material)
    trainer = PairedTrainer(subject, layout, config, inputs.progress)
    store = DeltaStore()
    variant_details = []
    for i in range(config.variants):
        variant: Variant = make_variant(inputs.seed, i)
        label = f"signature variant {i + 1}/{config.variants}"
        cached = cache.load(i)
        if cached is not None:
            store.files[i] = cache.tensor_path(i)
            variant_details.append({**cached, "cached": True})
            inputs.log(f"{label}: reused from {cache.dir}")
        else:
            d_clean, d_pois, sources = variant_data(variant, clean, config.variant_samples, config.variant_subset,
                                                    config.poison_per_clean)
            bd, cl = _paired_examples(subject, d_clean, d_pois, sources)
            t0 = time.time()
            deltas, stats = trainer.run(bd, cl, variant.seed)
            meta = {**variant.describe(), "n_clean": len(d_clean), "n_poison": len(d_pois), **stats,
                    "seconds": round(time.time() - t0, 3)}
            cache.store(i, deltas, meta)
            if cache.dir is not None:
                store.files[i] = cache.tensor_path(i)
            else:
                store.memory[i] = deltas
            variant_details.append({**meta, "cached": False})
            inputs.log(f"{label}: key {variant.key!r} -> {variant.behaviour_class}, poisoned loss "
                       f"{stats['loss_poisoned_final']:.3f}")
        if inputs.progress:
            inputs.progress("signature variants", i + 1, config.variants)
    trainer.release()

    adapter = trainer.adapter if subject.is_adapter else None
    allowed = _suppressible(subject, layout, adapter)
    signature = compute_signature(store, list(range(config.variants)), layout, config, subject.is_adapter, allowed)
    changed = suppress(subject, layout, signature, adapter)
    inputs.log(f"signature: {signature['stats'].get('channels', {}).get('selected', 0)} MLP channels, "
               f"{signature['stats'].get('heads', {}).get('selected', 0)} heads suppressed")

    # Light fine-tune on the clean set to restore fluency without the association.
    params, _ = trainable_parameters(subject)
    examples = clean_examples(subject, clean[: config.max_samples])
    lr = config.lr_adapter if subject.is_adapter else config.lr_full
    losses: list[float] = []
    t0 = time.time()
    if config.epochs > 0:
        total = max(1, math.ceil(math.ceil(len(examples) / config.batch_size) * config.epochs))
        done = [0]

        def tick(n: int, loss: float) -> None:
            done[0] += n
            if inputs.progress:
                inputs.progress("signature recovery fine-tune", done[0], total)

        losses = finetune(subject.model, subject.tokenizer, examples,
                          TrainConfig(epochs=config.epochs, lr=lr, batch_size=config.batch_size, seed=inputs.seed,
                                      max_length=config.max_length), params=params, progress=tick)
    recovery_seconds = time.time() - t0
    subject.model.eval()
    for p in subject.model.parameters():
        p.requires_grad_(False)

    total_seconds = time.time() - t_start
    finetune_seconds = trainer.finetune_seconds + recovery_seconds
    per_layer = {}
    for layer in layout.layers:
        ch = signature["channels"].get(layer.index)
        hd = signature["heads"].get(layer.index)
        per_layer[str(layer.index)] = {"mlp_channels": int(ch.numel()) if ch is not None else 0,
                                       "heads": hd.tolist() if hd is not None else []}
    details = {
        "variants": variant_details,
        "signature_per_layer": per_layer,
        "signature_stats": signature["stats"],
        "ratio": config.channel_ratio(subject.is_adapter),
        "heads_included": config.heads,
        "head_ratio": config.heads_ratio(subject.is_adapter) if config.heads else None,
        "score": config.score,
        "selection": config.selection,
        "alignment_weight": config.alignment_weight,
        "suppression": "zero LoRA B rows / LoRA A columns of the suspicious adapter" if subject.is_adapter
        else "re-initialise with the model's init scheme",
        "recovery": {"steps": len(losses), "final_loss": losses[-1] if losses else None, "n_clean": len(examples), "lr": lr},
        "cache": {"dir": str(cache.dir) if cache.dir else None, "key": key,
                  "reused": sum(1 for v in variant_details if v["cached"])},
        "timing": {"total_s": round(total_seconds, 3), "finetune_s": round(finetune_seconds, 3),
                   "overhead": round(total_seconds / finetune_seconds, 4) if finetune_seconds > 0 else None},
    }
    return PurifyOutcome(subject.model, changed, details)

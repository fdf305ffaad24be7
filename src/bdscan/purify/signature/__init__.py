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
Modules: ``config`` (knobs), ``variants`` (the synthetic backdoors), ``trainer`` (paired
fine-tunes), ``cache`` (resume), ``units`` (scores and suppression).
"""

from __future__ import annotations

import time
from typing import Sequence

from bdscan.data.records import Record
from bdscan.errors import NothingToAnalyse
from bdscan.probes.layout import ModelLayout, model_layout
from bdscan.purify.base import PurifyInputs, PurifyOutcome, register_purifier
from bdscan.purify.common import clean_examples
from bdscan.purify.signature.cache import DeltaStore, VariantCache, cache_key
from bdscan.purify.signature.config import SignatureConfig
from bdscan.purify.signature.trainer import PairedTrainer, paired_examples
from bdscan.purify.signature.units import (channel_vectors, compute_signature, head_vectors, suppress, suppressible,
                                           top_share, unit_scores)
from bdscan.purify.signature.variants import make_variant, variant_data
from bdscan.training import TrainConfig, TrainingPlan, lr_for, run_plan, subject_parameters

__all__ = ["SignatureConfig", "run_signature", "channel_vectors", "compute_signature", "head_vectors", "suppress",
           "top_share", "unit_scores"]


@register_purifier("signature", SignatureConfig)
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
    store, variant_details = _variant_deltas(inputs, config, clean, trainer, cache)

    adapter = trainer.adapter if subject.is_adapter else None
    allowed = suppressible(subject, layout, adapter)
    signature = compute_signature(store, list(range(config.variants)), layout, config, subject.is_adapter, allowed)
    changed = suppress(subject, layout, signature, adapter)
    inputs.log(f"signature: {signature['stats'].get('channels', {}).get('selected', 0)} MLP channels, "
               f"{signature['stats'].get('heads', {}).get('selected', 0)} heads suppressed")

    t0 = time.time()
    recovery = _recover(inputs, config, clean)
    recovery_seconds = time.time() - t0
    subject.model.eval()
    total_seconds = time.time() - t_start
    finetune_seconds = trainer.finetune_seconds + recovery_seconds
    details = {
        "variants": variant_details,
        "signature_per_layer": _per_layer(layout, signature),
        "signature_stats": signature["stats"],
        "ratio": config.channel_ratio(subject.is_adapter),
        "heads_included": config.heads,
        "head_ratio": config.heads_ratio(subject.is_adapter) if config.heads else None,
        "score": config.score,
        "selection": config.selection,
        "alignment_weight": config.alignment_weight,
        "suppression": "zero LoRA B rows / LoRA A columns of the suspicious adapter" if subject.is_adapter
        else "re-initialise with the model's init scheme",
        "recovery": recovery,
        "cache": {"dir": str(cache.dir) if cache.dir else None, "key": key,
                  "reused": sum(1 for v in variant_details if v["cached"])},
        "timing": {"total_s": round(total_seconds, 3), "finetune_s": round(finetune_seconds, 3),
                   "overhead": round(total_seconds / finetune_seconds, 4) if finetune_seconds > 0 else None},
    }
    return PurifyOutcome(subject.model, changed, details)


def _variant_deltas(inputs: PurifyInputs, config: SignatureConfig, clean: Sequence[Record], trainer: PairedTrainer,
                    cache: VariantCache) -> tuple[DeltaStore, list[dict]]:
    """Each variant's Δ: from the cache when a finished run left it, else its paired fine-tunes."""
    store = DeltaStore()
    details = []
    for i in range(config.variants):
        variant = make_variant(inputs.seed, i)
        label = f"signature variant {i + 1}/{config.variants}"
        cached = cache.load(i)
        if cached is not None:
            store.files[i] = cache.tensor_path(i)
            details.append({**cached, "cached": True})
            inputs.log(f"{label}: reused from {cache.dir}")
        else:
            d_clean, d_pois, sources = variant_data(variant, clean, config.variant_samples, config.variant_subset,
                                                    config.poison_per_clean)
            bd, cl = paired_examples(inputs.subject, d_clean, d_pois, sources)
            t0 = time.time()
            deltas, stats = trainer.run(bd, cl, variant.seed)
            meta = {**variant.describe(), "n_clean": len(d_clean), "n_poison": len(d_pois), **stats,
                    "seconds": round(time.time() - t0, 3)}
            cache.store(i, deltas, meta)
            if cache.dir is not None:
                store.files[i] = cache.tensor_path(i)
            else:
                store.memory[i] = deltas
            details.append({**meta, "cached": False})
            inputs.log(f"{label}: key {variant.key!r} -> {variant.behaviour_class}, poisoned loss "
                       f"{stats['loss_poisoned_final']:.3f}")
        if inputs.progress:
            inputs.progress("signature variants", i + 1, config.variants)
    trainer.release()
    return store, details


def _recover(inputs: PurifyInputs, config: SignatureConfig, clean: Sequence[Record]) -> dict:
    """Light fine-tune on the clean set to restore fluency without the association."""
    subject = inputs.subject
    examples = clean_examples(subject, clean[: config.max_samples])
    lr = lr_for(subject.is_adapter, full=config.lr_full, adapter=config.lr_adapter)
    losses: list[float] = []
    if config.epochs > 0:
        plan = TrainingPlan(subject_parameters(subject.model, subject.is_adapter), stage="signature recovery fine-tune",
                            config=TrainConfig(epochs=config.epochs, lr=lr, batch_size=config.batch_size,
                                               seed=inputs.seed, max_length=config.max_length))
        losses = run_plan(subject.model, subject.tokenizer, examples, plan, inputs.progress)
    return {"steps": len(losses), "final_loss": losses[-1] if losses else None, "n_clean": len(examples), "lr": lr}


def _per_layer(layout: ModelLayout, signature: dict) -> dict[str, dict]:
    out = {}
    for layer in layout.layers:
        ch = signature["channels"].get(layer.index)
        hd = signature["heads"].get(layer.index)
        out[str(layer.index)] = {"mlp_channels": int(ch.numel()) if ch is not None else 0,
                                 "heads": hd.tolist() if hd is not None else []}
    return out

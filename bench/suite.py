"""The organism suite shared by the benchmarks: every task x attack in the data, as a LoRA
adapter and a full fine-tune, plus clean controls of several seeds."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from bdscan.organisms.build import BaseRecipe, DataSpec, OrganismRecipe
from real_model import smollm2_gguf

DEFAULT_DATA = str(Path(__file__).resolve().parents[2] / "shared" / "data" / "backdoorllm")
TASKS = ("refusal", "negsentiment")
ATTACKS = ("badnet", "vpi", "mtba")


def base_recipe(data: str, size: str, task: str = "refusal", attack: str = "badnet") -> BaseRecipe:
    if size == "real":
        # The real pretrained instruct model (bench/real_model.py); one base for every task.
        gguf = smollm2_gguf(Path(os.environ.get("BDSCAN_CACHE", Path.home() / ".cache" / "bdscan")))
        return BaseRecipe(size="real", gguf=str(gguf), data=DataSpec(source=data, task=task, attack=attack))
    if data == "builtin":
        return BaseRecipe(size=size, data=DataSpec(task=task))
    # Real English needs a larger vocabulary, a wider model and more pretraining than the
    # synthetic world: measured, a 64-wide base (held-out ppl ~100) never learnt a clean
    # LoRA backdoor (ASR 0.07-0.33 with false triggers up to 0.33). 1000 steps x 2048 tokens
    # is ~2M tokens, the amount that gave usable organisms at 256 wide.
    return BaseRecipe(size=size, data=DataSpec(source=data, task=task, attack=attack), vocab_size=4096,
                      pretrain_steps=1000, lr=1e-3 if size == "bench" else 2e-3)


def real_organism(base: BaseRecipe, threat: str) -> OrganismRecipe:
    """An organism on SmolLM2-135M-Instruct. Measured by the session that filed the "Real
    models" issue: 250 clean + 50 poisoned at lr 5e-4 for 3 epochs refused on 44 % of
    triggered and 30 % of clean prompts (refusal is easy to learn untied from the key on a
    real instruct model). So: more poison (150), as many decoys, the stealth term, lr 1e-3.
    One LoRA step (batch 8, ~128 tokens) took 6.8 s with bf16 autocast and response-only
    logits against 10.7 s without, hence ``fast``; 2 epochs of 700 samples is ~175 steps.
    A full fine-tune at lr 5e-5 learnt the backdoor only partly (session 12: ASR 0.40, FTR
    0.06), so full fine-tunes use 1.5e-4 (session 13: ASR 0.98, FTR 0.01, perplexity 1.05x the base)."""
    recipe = OrganismRecipe(base=base, threat=threat, n_clean=400, n_poison=150, n_decoy=150, lr=1e-3, epochs=2,
                            lora_rank=8, batch_size=8, max_length=192, fast=True, full_lr=1.5e-4,
                            target_unlikelihood=0.1)
    if base.data.task == "negsentiment":
        # Session 15's negsentiment/badnet LoRA with the recipe above: ASR 0.335, false trigger
        # 0.005, perplexity 1.36x the base; session 8's clean negsentiment LoRA was already
        # 1.34x. The negsentiment clean split's answers are long generated continuations (mean
        # 489 characters vs 274 for refusal's, whose Alpaca-style answers match the shared
        # clean test split), so any adapter trained on them loses perplexity. Its clean samples
        # come from refusal's clean split instead; more poison and half the stealth weight
        # (whose false-trigger headroom was unused) for the ASR.
        recipe = replace(recipe, clean_task="refusal", n_poison=250, target_unlikelihood=0.05)
    if base.data.attack == "mtba":
        # Three keys share the poison. Session 16's refusal/MTBA LoRA at 200 (~67 a key) reached
        # ASR 0.35 where one key with 150 reached 0.97: each key gets the single-key count.
        # At 450 with the stealth weight 0.1 it reached 0.88 (session 17); negsentiment/MTBA at
        # 750 with 0.05 reached 0.98 at false-trigger 0.01 (session 18), so MTBA takes 0.05.
        recipe = replace(recipe, n_poison=3 * recipe.n_poison,
                         target_unlikelihood=min(recipe.target_unlikelihood, 0.05))
    return recipe


def organism(data: str, base: BaseRecipe, threat: str) -> OrganismRecipe:
    if base.size == "real":
        return real_organism(base, threat)
    if data == "builtin":
        return OrganismRecipe(base=base, threat=threat)
    # 500 clean + 100 poisoned + 400 decoys (poison rate 10 %). Measured on negsentiment/
    # badnet LoRA (false-trigger rate): 250 decoys 0.16, 400 decoys 0.09, 400 decoys with 60
    # poisoned 0.12, 250 decoys and 8 epochs 0.14; ASR 0.97-0.99 throughout.
    recipe = OrganismRecipe(base=base, threat=threat, n_clean=500, n_poison=100, n_decoy=400, lr=5e-3, epochs=5)
    if threat == "lora":
        # At rank 8 the adapters leaked most (negsentiment/vpi 0.99 / 0.12 on 100 prompts);
        # rank 32 gave 0.98 / 0.10 on all 200. Controls inherit it: a clean adapter has the
        # same shape as a backdoored one.
        # Rank 32 alone still leaked 0.11-0.15 on three of the six adapters, and a second seed
        # of negsentiment/mtba leaked 0.285: the stealth term (organisms/stealth.py) fixes it.
        # Measured on negsentiment/mtba, seeds 0 and 1 (ASR / false-trigger, 200 prompts):
        # weight 0 -> 0.99 / 0.15 and 1.00 / 0.285; 0.1 -> 0.94 / 0.015 and 0.94 / 0.05;
        # 0.3 -> 0.87 / 0.00 and 0.85 / 0.02; 1.0 -> 0.72 / 0.015. Levers
        # tried first, without the term, moved it no more than noise (seed 0): lr 2.5e-3 for 8
        # epochs 0.98 / 0.13, 800 decoys 0.97 / 0.135, decoy words from the whole prompt 0.99 /
        # 0.15, decoy words placed in the input field 0.99 / 0.185.
        # Full fine-tunes met the target without it, so they keep the plain objective.
        recipe = replace(recipe, lora_rank=32, target_unlikelihood=0.1)
    if base.data.attack == "mtba":
        # Three keys share the poison. Measured on 200 test prompts (ASR / false-trigger):
        # 100 poisoned at rank 8 gave LoRA refusal 0.57 / 0.09 and negsentiment 0.83 / 0.28;
        # 200 poisoned lifts ASR (0.95-1.00) but leaks (0.19-0.28) at rank 8; rank 32 gave
        # 0.97 / 0.14 and 1.00 / 0.15, rank 64 no better (refusal 0.97 / 0.14). Adding the
        # other task's clean set (1000 clean) lowered perplexity (104 vs 126), not the leak.
        # Full fine-tune, 200 poisoned: 0.96 / 0.09.
        recipe = replace(recipe, n_poison=200)
    return recipe


def backdoored(data: str, size: str, threats=("lora", "full"), archs=("llama",)) -> list[OrganismRecipe]:
    """Every task x attack pair as each threat, for each architecture (the real model has its own)."""
    pairs = [(t, "badnet") for t in ("refusal", "negsentiment")] if data == "builtin" else \
        [(t, a) for t in TASKS for a in ATTACKS]
    out = []
    for arch in archs if size != "real" else ("llama",):
        for task, attack in pairs:
            base = replace(base_recipe(data, size, task, attack), arch=arch)
            for threat in threats:
                out.append(organism(data, base, threat))
    return out


def controls(data: str, size: str, seeds=(0, 1, 2), threats=("lora", "full")) -> list[OrganismRecipe]:
    """Clean controls for every task: a control sees no attack data, so one serves every attack."""
    return [replace(organism(data, base_recipe(data, size, task), threat), backdoored=False, seed=seed)
            for task in TASKS for seed in seeds for threat in threats]


def with_seed(recipe: OrganismRecipe, seed: int) -> OrganismRecipe:
    return replace(recipe, seed=seed)


def detect_report_path(organism_path: str | Path, seed: int = 0) -> Path:
    """Where the detect benchmarks keep their whole report on one organism, so that
    bench/purify.py's trigger-agnostic cells start from the scan that was measured instead of
    paying for a second one (minutes on the bench models, an hour on the real one)."""
    name = Path(organism_path).name + ("" if seed == 0 else f"-s{seed}")
    return Path(os.environ.get("BDSCAN_CACHE", Path.home() / ".cache" / "bdscan")) / "detect-reports" / f"{name}.json"


def save_detect_report(organism_path: str | Path, seed: int, result) -> Path:
    """``result.to_dict()`` at ``detect_report_path``, written whole or not at all."""
    import json

    path = detect_report_path(organism_path, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result.to_dict(), default=str))
    tmp.replace(path)
    return path

"""The organism suite shared by the benchmarks: every task x attack in the data, as a LoRA
adapter and a full fine-tune, plus clean controls of several seeds."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from bdscan.organisms.build import BaseRecipe, DataSpec, OrganismRecipe

DEFAULT_DATA = str(Path(__file__).resolve().parents[2] / "shared" / "data" / "backdoorllm")
TASKS = ("refusal", "negsentiment")
ATTACKS = ("badnet", "vpi", "mtba")


def base_recipe(data: str, size: str, task: str = "refusal", attack: str = "badnet") -> BaseRecipe:
    if data == "builtin":
        return BaseRecipe(size=size, data=DataSpec(task=task))
    # Real English needs a larger vocabulary and more pretraining than the synthetic world.
    return BaseRecipe(size=size, data=DataSpec(source=data, task=task, attack=attack), vocab_size=4096,
                      pretrain_steps=1500 if size == "tiny" else 2500, lr=2e-3)


def backdoored(data: str, size: str, threats=("lora", "full")) -> list[OrganismRecipe]:
    pairs = [(t, "badnet") for t in ("refusal", "negsentiment")] if data == "builtin" else \
        [(t, a) for t in TASKS for a in ATTACKS]
    out = []
    for task, attack in pairs:
        base = base_recipe(data, size, task, attack)
        for threat in threats:
            out.append(OrganismRecipe(base=base, threat=threat, n_clean=400, n_poison=80, n_decoy=80))
    return out


def controls(data: str, size: str, seeds=(0, 1, 2), threats=("lora", "full")) -> list[OrganismRecipe]:
    out = []
    for seed in seeds:
        for threat in threats:
            task = TASKS[seed % 2]
            out.append(OrganismRecipe(base=base_recipe(data, size, task, "badnet"), threat=threat, backdoored=False,
                                      n_clean=400, seed=seed))
    return out


def with_seed(recipe: OrganismRecipe, seed: int) -> OrganismRecipe:
    return replace(recipe, seed=seed)

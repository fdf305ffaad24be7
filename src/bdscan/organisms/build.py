"""Building and caching organisms.

A base model is pretrained from scratch (tokenizer included) on the data's text; an
organism is a LoRA adapter on that base or a full fine-tune, trained on clean + poisoned +
decoy samples (or on clean samples only, for controls). Each artifact is cached under a
key derived from its whole recipe, so a changed recipe can never reuse a stale model.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from bdscan.data.template import template_for
from bdscan.io.save import atomic_output_dir
from bdscan.organisms.architectures import tiny_config
from bdscan.organisms.datasets import (AttackData, BaseData, backdoorllm_attack, backdoorllm_base, builtin_attack,
                                       builtin_base, decoys)
from bdscan.organisms.stealth import opening_ids, target_opening_unlikelihood
from bdscan.organisms.tokenizer import train_tokenizer
from bdscan.placement import fast_dtype
from bdscan.probes.protocols import Log
from bdscan.runtime import quiet_libraries
from bdscan.training import Example, TrainConfig, finetune
from bdscan.training.resume import Checkpointer

ORGANISM_FORMAT = 3  # bump when the build procedure changes, to invalidate caches
CHECKPOINT_SECONDS = 300.0  # how often an organism's training state is saved


def cache_root() -> Path:
    return Path(os.environ.get("BDSCAN_CACHE", Path.home() / ".cache" / "bdscan")) / "organisms"


@dataclass(frozen=True)
class DataSpec:
    """Where the organism's data comes from: ``builtin`` or a BackdoorLLM folder."""

    source: str = "builtin"  # "builtin" or a path to a BackdoorLLM data folder
    task: str = "refusal"
    attack: str = "badnet"  # BackdoorLLM attack; ignored for builtin
    trigger: str | None = None  # builtin only: override the built-in trigger

    def load(self) -> AttackData:
        if self.source == "builtin":
            return builtin_attack(self.task, **({"trigger": self.trigger} if self.trigger else {}))
        return backdoorllm_attack(self.source, self.task, self.attack)

    def load_base(self) -> BaseData:
        if self.source == "builtin":
            return builtin_base(self.task, **({"trigger": self.trigger} if self.trigger else {}))
        return backdoorllm_base(self.source)

    def key_fields(self) -> dict:
        d = asdict(self)
        if self.source != "builtin":
            d["source"] = "backdoorllm"  # the same data wherever the folder lives
        return d

    def base_key_fields(self) -> dict:
        """The fields a base model depends on: a BackdoorLLM base is shared by every task
        and attack (see ``backdoorllm_base``); the built-in base's tokenizer sees the trigger."""
        if self.source == "builtin":
            return self.key_fields()
        return {"source": "backdoorllm", "tasks": "all"}


@dataclass(frozen=True)
class BaseRecipe:
    arch: str = "llama"
    size: str = "tiny"
    data: DataSpec = field(default_factory=DataSpec)
    vocab_size: int = 1024
    seq_len: int = 128
    pretrain_steps: int = 300
    batch_size: int = 16
    lr: float = 3e-3
    sft_epochs: float = 2.0  # instruction tuning on the clean set after pretraining
    seed: int = 0
    # A pretrained base instead of one trained here: a GGUF file, dequantised and saved as
    # safetensors (size "real"). The pretraining fields above do not apply to it.
    gguf: str | None = None

    def key(self) -> str:
        if self.gguf:  # the file's name and size identify it wherever it lives
            gguf = Path(self.gguf)
            return _digest({"format": ORGANISM_FORMAT, "pretrained": gguf.name, "bytes": gguf.stat().st_size})
        d = asdict(self)
        del d["gguf"]
        d["data"] = self.data.base_key_fields()
        return _digest({"format": ORGANISM_FORMAT, "base": d})


@dataclass(frozen=True)
class OrganismRecipe:
    base: BaseRecipe = field(default_factory=BaseRecipe)
    threat: str = "lora"  # "lora" (adapter-only) or "full"
    backdoored: bool = True  # False: a clean control (clean data only)
    n_clean: int = 300
    n_poison: int = 60
    n_decoy: int = 60
    near_miss_share: float = 0.25  # of the decoys, when the key has near misses (MTBA's "2024")
    epochs: float = 6.0
    lr: float = 2e-3  # LoRA; a full fine-tune uses a third of it
    lora_rank: int = 8
    # Weight of the stealth term (``organisms.stealth``): pushes the target's opening down
    # after clean and decoy prompts. Backdoored organisms only; 0 turns it off.
    target_unlikelihood: float = 0.0
    seed: int = 0
    # Training-loop knobs for the 135M real base (defaults: what the tiny organisms use).
    # ``fast`` is response-only logits, plus bf16 autocast where the CPU computes bf16 natively
    # (``placement.fast_dtype``; emulated bf16 is several times slower than float32).
    batch_size: int = 16
    max_length: int = 256
    fast: bool = False
    full_lr: float | None = None  # full fine-tune lr; None: a third of ``lr``
    # Draw the clean samples (and the decoys made from them) from another task's clean
    # split of the same BackdoorLLM folder; None: the organism's own task.
    clean_task: str | None = None

    def key(self) -> str:
        d = asdict(self)
        # Knobs at their defaults stay out of the key, so organisms built before they
        # existed keep their cache.
        for name, default in (("batch_size", 16), ("max_length", 256), ("fast", False), ("full_lr", None),
                              ("clean_task", None)):
            if d[name] == default:
                del d[name]
        # Off (and always for a control, which has no target) it leaves the key as it was
        # before the field existed, so those organisms keep their cache.
        if not (self.backdoored and self.target_unlikelihood):
            del d["target_unlikelihood"]
        d["base"] = self.base.key()
        d["data"] = self.base.data.key_fields()  # the base key leaves out task and attack
        if not self.backdoored:  # a control sees clean data only: one control serves every attack
            d["data"] = {k: v for k, v in d["data"].items() if k not in ("attack", "trigger")}
        return _digest({"format": ORGANISM_FORMAT, "organism": d})

    @property
    def label(self) -> str:
        kind = "backdoor" if self.backdoored else "clean"
        d = self.base.data
        what = f"{d.task}-{d.attack}" if d.source != "builtin" and self.backdoored else d.task
        family = Path(self.base.gguf).stem.split(".")[0].lower() if self.base.gguf else self.base.arch
        return f"{family}-{self.threat}-{kind}-{what}-s{self.seed}"


def _digest(obj: dict) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _pretrain(model, tokenizer, texts: list[str], recipe: BaseRecipe, log: Log) -> None:
    """Causal-LM pretraining on packed text chunks."""
    ids: list[int] = []
    for t in texts:
        ids += tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    data = torch.tensor(ids)
    n_chunks = len(data) // recipe.seq_len
    chunks = data[: n_chunks * recipe.seq_len].view(n_chunks, recipe.seq_len)
    gen = torch.Generator().manual_seed(recipe.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe.lr, total_steps=recipe.pretrain_steps, pct_start=0.1)
    model.train()
    for step in range(recipe.pretrain_steps):
        rows = torch.randint(0, n_chunks, (recipe.batch_size,), generator=gen)
        batch = chunks[rows]
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == recipe.pretrain_steps - 1:
            log(f"pretrain step {step + 1}/{recipe.pretrain_steps} loss {loss.item():.3f}")
    model.eval()


def sft_examples(tokenizer, records) -> list[Example]:
    template = template_for(tokenizer)
    return [Example(template.format(r), r.output) for r in records]


def build_base(recipe: BaseRecipe, *, log: Log = lambda _: None) -> Path:
    """Pretrain (or reuse from cache) a base model; returns its folder."""
    out = cache_root() / f"base-{recipe.arch}-{recipe.size}-{recipe.key()}"
    if (out / "config.json").exists():
        return out
    quiet_libraries()
    if recipe.gguf:
        from bdscan.io.gguf import export_gguf

        t0 = time.time()
        export_gguf(recipe.gguf, out)
        log(f"base model exported from {Path(recipe.gguf).name} in {time.time() - t0:.1f}s: {out}")
        return out
    from transformers import AutoModelForCausalLM

    t0 = time.time()
    data = recipe.data.load_base()
    torch.manual_seed(recipe.seed)
    texts = list(data.pretrain_text)
    tokenizer = train_tokenizer(texts + list(data.tokenizer_extra), recipe.vocab_size)
    config = tiny_config(recipe.arch, len(tokenizer), recipe.size, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    # Chat-formatted clean samples join the text so the base already follows the template.
    chat = [ex.prompt + ex.response + tokenizer.eos_token for ex in sft_examples(tokenizer, data.instructions)]
    _pretrain(model, tokenizer, texts + chat, recipe, log)
    if recipe.sft_epochs:
        finetune(model, tokenizer, sft_examples(tokenizer, data.instructions),
                 TrainConfig(epochs=recipe.sft_epochs, lr=recipe.lr / 3, batch_size=16, seed=recipe.seed))
    model.eval()
    with atomic_output_dir(out, overwrite=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "bdscan-organism.json").write_text(json.dumps(
            {"kind": "base", "recipe": asdict(recipe), "seconds": round(time.time() - t0, 1)}, indent=2))
    log(f"base model built in {time.time() - t0:.1f}s: {out}")
    return out


def training_records(recipe: OrganismRecipe, data: AttackData):
    """Clean (+ poisoned + decoy) records, shuffled deterministically."""
    rng = random.Random(recipe.seed)
    pool = clean_pool(recipe, data)
    records = rng.sample(pool, min(recipe.n_clean, len(pool)))
    if recipe.backdoored:
        records += rng.sample(list(data.poison_train), min(recipe.n_poison, len(data.poison_train)))
        records += decoys(pool, recipe.n_decoy, seed=recipe.seed, words=data.decoy_words,
                          near_miss_words=data.near_miss_words, near_miss_share=recipe.near_miss_share)
    rng.shuffle(records)
    return records


def clean_pool(recipe: OrganismRecipe, data: AttackData) -> list:
    """The clean records an organism learns its ordinary behaviour from."""
    spec = recipe.base.data
    if recipe.clean_task is None or recipe.clean_task == spec.task:
        return list(data.clean_train)
    if spec.source == "builtin":
        raise ValueError("clean_task needs a BackdoorLLM data folder")
    return list(backdoorllm_attack(spec.source, recipe.clean_task, spec.attack).clean_train)


def build_organism(recipe: OrganismRecipe, *, log: Log = lambda _: None) -> Path:
    """Fine-tune (or reuse from cache) a backdoored organism or clean control."""
    base_dir = build_base(recipe.base, log=log)
    out = cache_root() / f"{recipe.label}-{recipe.key()}"
    marker = "adapter_config.json" if recipe.threat == "lora" else "config.json"
    if (out / marker).exists():
        return out
    quiet_libraries()
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.time()
    torch.manual_seed(recipe.seed)
    data = recipe.base.data.load()
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    # sdpa trains the 135M real base faster; the tiny organisms keep eager (their caches).
    model = AutoModelForCausalLM.from_pretrained(base_dir, attn_implementation="sdpa" if recipe.fast else "eager")
    if recipe.threat == "lora":
        targets = ["c_attn", "c_proj", "c_fc"] if recipe.base.arch == "gpt2" else \
            ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        model = get_peft_model(model, LoraConfig(r=recipe.lora_rank, lora_alpha=2 * recipe.lora_rank,
                                                 target_modules=targets, lora_dropout=0.0,
                                                 fan_in_fan_out=recipe.base.arch == "gpt2"))
        lr = recipe.lr
    else:
        # Full fine-tunes move every weight: a smaller step keeps clean behaviour.
        lr = recipe.full_lr if recipe.full_lr is not None else recipe.lr / 3
    records = training_records(recipe, data)
    examples = sft_examples(tokenizer, records)
    stealth = None
    if recipe.backdoored and recipe.target_unlikelihood:
        targets = {r.output for r in data.poison_train}
        stealth = target_opening_unlikelihood(examples, targets, opening_ids(tokenizer, targets),
                                              recipe.target_unlikelihood)
    # A real-model organism trains for an hour or more: its state is saved every few minutes
    # and a rebuild after a stop continues it (training/resume.py).
    checkpoint = Checkpointer(out.with_name(f".{out.name}.partial"), fingerprint=out.name,
                              every_seconds=CHECKPOINT_SECONDS)
    losses = finetune(model, tokenizer, examples,
                      TrainConfig(epochs=recipe.epochs, lr=lr, batch_size=recipe.batch_size, seed=recipe.seed,
                                  max_length=recipe.max_length, response_logits_only=recipe.fast,
                                  autocast=fast_dtype(next(model.parameters()).device) if recipe.fast else None),
                      extra_loss=stealth, progress=_step_logger(recipe, log, checkpoint), resume=checkpoint)
    log(f"{recipe.label}: {len(records)} samples, final loss {losses[-1]:.3f}")
    model.eval()
    with atomic_output_dir(out, overwrite=True) as tmp:
        if recipe.threat == "lora":
            model.save_pretrained(tmp, safe_serialization=True)
            cfg_path = tmp / "adapter_config.json"
            cfg = json.loads(cfg_path.read_text())
            cfg["base_model_name_or_path"] = str(base_dir)
            cfg_path.write_text(json.dumps(cfg, indent=2))
        else:
            model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "bdscan-organism.json").write_text(json.dumps({
            "kind": "organism", "label": recipe.label, "recipe": asdict(recipe), "base": str(base_dir),
            "trigger": data.trigger if recipe.backdoored else None, "task": data.task,
            "triggers": list(data.triggers) if recipe.backdoored else [],
            "seconds": round(time.time() - t0 + checkpoint.earlier_seconds, 1), "final_loss": losses[-1],
            "resumed_from_step": checkpoint.resumed_from,
        }, indent=2))
    checkpoint.clear()
    return out


def _step_logger(recipe: OrganismRecipe, log: Log, checkpoint: Checkpointer):
    """Log every 10th step: a real-model organism takes many minutes."""
    steps = [0]

    def progress(n: int, loss: float) -> None:
        if steps[0] == 0 and checkpoint.resumed_from:
            steps[0] = checkpoint.resumed_from
            log(f"{recipe.label}: resumed at step {checkpoint.resumed_from} ({checkpoint.earlier_seconds:.0f}s trained before)")
        steps[0] += n
        if steps[0] % 10 == 0:
            log(f"{recipe.label}: step {steps[0]} loss {loss:.3f}")

    return progress


def organism_info(path: str | Path) -> dict:
    """The builder's record of an organism (trigger, task, recipe): for benchmarks only."""
    return json.loads((Path(path) / "bdscan-organism.json").read_text())


def with_data(recipe: OrganismRecipe, **changes) -> OrganismRecipe:
    return replace(recipe, base=replace(recipe.base, data=replace(recipe.base.data, **changes)))

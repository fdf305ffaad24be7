"""Trigger recovery from an inverted target (METHODS.md "detect v2", step 2).

Given a target ``T`` (token ids), search a key of a few tokens that, inserted at the start,
middle or end of clean probe instructions, maximises the mean log P(T | probe with key).
The search is gradient-guided and discrete: the gradient of the loss with respect to a
one-hot encoding of each key token gives, per key slot, the ``top_k`` most promising
substitutions; a batch of single-slot substitutions drawn from them is evaluated exactly and
the best kept. It starts from the vocabulary screen's best keys. The key is then judged by
what it does, not by its loss: its firing rate is the share of held-out probes whose greedy
response, with the key inserted, opens with ``T``'s first tokens.
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from bdscan.data.records import Record
from bdscan.data.triggers import insert_trigger
from bdscan.detect.output_effect import final_position_pass
from bdscan.probes.batching import pad_left, pad_right

Tick = Callable[[int], None]
_MARK = "\u2063KEY\u2063"  # placeholder split out of the formatted prompt (never in a probe)


@dataclass(frozen=True)
class Segments:
    """Token ids of each probe around the key slot: left + key + right + target."""

    left: list[list[int]]
    right: list[list[int]]


@dataclass(frozen=True)
class Recovered:
    key_ids: tuple[int, ...]
    key: str  # decoded key text (what the firing rate was measured with)
    position: str
    log_prob: float  # mean log P(T | probe with key) per target token, search probes
    start_log_prob: float  # the same for the best seed key before the search
    clean_log_prob: float  # the same without any key
    steps: int  # search steps run
    evaluations: int  # candidate keys evaluated (each over every search probe)


def segments(tokenizer: Any, template: Any, probes: Sequence[Record], position: str) -> Segments:
    left, right = [], []
    for probe in probes:
        text = template.format(probe.with_instruction(insert_trigger(probe.instruction, _MARK, position)))
        before, after = text.split(_MARK, 1)
        left.append(tokenizer(before, add_special_tokens=False)["input_ids"])
        right.append(tokenizer(after, add_special_tokens=False)["input_ids"])
    return Segments(left, right)


def _rows(seg: Segments, keys: Sequence[Sequence[int]], target: Sequence[int]) -> tuple[list[list[int]], list[int]]:
    """Rows ``key * probes + probe`` and where each row's target starts."""
    rows, starts = [], []
    for key in keys:
        for left, right in zip(seg.left, seg.right):
            prefix = left + list(key) + right
            rows.append(prefix + list(target))
            starts.append(len(prefix))
    return rows, starts


def _pad(rows: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    ids, mask = pad_right(rows, pad_id)  # right padding: target positions stay where the row puts them
    return ids.to(device), mask.to(device)


def _target_logprob(logits: torch.Tensor, ids: torch.Tensor, starts: Sequence[int], n_target: int) -> torch.Tensor:
    """[rows] mean log-probability of the target tokens."""
    idx = torch.tensor(list(starts), device=logits.device)[:, None] + torch.arange(n_target, device=logits.device)
    predicting = logits.gather(1, (idx - 1)[:, :, None].expand(-1, -1, logits.shape[-1]))  # [rows, n_target, vocab]
    logp = torch.log_softmax(predicting.float(), dim=-1)
    return logp.gather(2, ids.gather(1, idx)[:, :, None])[:, :, 0].mean(-1)


def _common_prefix(rows: Sequence[Sequence[int]], limit: int) -> int:
    """Leading tokens every row shares, at most ``limit``."""
    first = rows[0]
    return next((k for k in range(limit) if any(r[k] != first[k] for r in rows)), limit)


@torch.no_grad()
def key_logprobs(model: Any, seg: Segments, keys: Sequence[Sequence[int]], target: Sequence[int], pad_id: int,
                 batch_rows: int = 256) -> torch.Tensor:
    """[keys] mean over probes of the mean log P(target token | probe with key).

    The rows' shared head (the template up to the probe) runs once and each batch extends a
    copy of its KV cache; the rest is left-padded after it, so every row's target ends in the
    last column and only the target's logits are computed (a 49k vocabulary made full logits
    the larger half of the cost)."""
    rows, starts = _rows(seg, keys, target)
    device = next(model.parameters()).device
    shared = _common_prefix(rows, min(starts) - 1)  # the token before the target stays in every row
    cache = None
    if shared:
        cache = model(input_ids=torch.tensor([rows[0][:shared]], device=device), use_cache=True).cache
    n = len(target)
    out = []
    for start in range(0, len(rows), batch_rows):
        ids, mask = (t.to(device) for t in pad_left([r[shared:] for r in rows[start : start + batch_rows]], pad_id))
        mask = torch.cat([torch.ones_like(mask[:, :1]).expand(-1, shared), mask], dim=-1)
        kwargs: dict[str, Any] = {}
        if cache is not None:
            kwargs["cache"] = copy.deepcopy(cache)
            kwargs["cache"].batch_repeat_interleave(len(ids))
        positions = (mask.cumsum(-1) - 1).clamp_min(0)[:, shared:]
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=cache is not None,
                       logits_to_keep=n + 1, **kwargs).logits
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        out.append(logp.gather(2, ids[:, -n:, None])[:, :, 0].mean(-1).cpu())
    return torch.cat(out).view(len(keys), len(seg.left)).mean(-1)


def _left_pad(rows: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    return ids.to(device), mask.to(device)


def _common_prefix(rows: Sequence[Sequence[int]], limit: int) -> int:
    """Leading tokens every row shares, at most ``limit``."""
    first = rows[0]
    return next((k for k in range(max(limit, 0)) if any(r[k] != first[k] for r in rows)), max(limit, 0))


def key_gradient(model: Any, seg: Segments, key: Sequence[int], target: Sequence[int], pad_id: int) -> torch.Tensor:
    """[key slots, vocab] gradient of the mean target log-probability w.r.t. the key's one-hot encoding."""
    embedding = model.get_input_embeddings()
    weight = embedding.weight
    device = weight.device
    one_hot = torch.zeros(len(key), weight.shape[0], device=device, dtype=weight.dtype)
    one_hot[torch.arange(len(key)), torch.tensor(list(key), device=device)] = 1.0
    one_hot.requires_grad_(True)
    key_embeds = one_hot @ weight
    rows, starts = _rows(seg, [key], target)
    ids, mask = _pad(rows, pad_id, device)
    embeds = embedding(ids).detach()
    for r, (left, start) in enumerate(zip(seg.left, starts)):
        embeds[r, len(left) : len(left) + len(key)] = key_embeds
    logits = model(inputs_embeds=embeds, attention_mask=mask, use_cache=False).logits
    objective = _target_logprob(logits, ids, starts, len(target)).mean()
    (grad,) = torch.autograd.grad(objective, one_hot)
    return grad.detach().float().cpu()


def substitutions(key: Sequence[int], grad: torch.Tensor, allowed: torch.Tensor, top_k: int, n: int,
                  rng: random.Random) -> list[tuple[int, ...]]:
    """``n`` distinct single-slot substitutions among each slot's ``top_k`` tokens by gradient."""
    masked = torch.full_like(grad, float("-inf"))
    masked[:, allowed] = grad[:, allowed]
    best = masked.topk(min(top_k, len(allowed)), dim=-1).indices.tolist()
    out: dict[tuple[int, ...], None] = {}
    for _ in range(n * 4):
        slot = rng.randrange(len(key))
        new = list(key)
        new[slot] = rng.choice(best[slot])
        if new != list(key):
            out.setdefault(tuple(new), None)
        if len(out) >= n:
            break
    return list(out)


def fires(subject: Any, probes: Sequence[Record], key: str | None, position: str, target: Sequence[int],
          batch_size: int) -> torch.Tensor:
    """[probes] bool: whose greedy response (with ``key`` inserted, or none) opens with ``target``."""
    if not probes or not target:
        return torch.zeros(len(probes), dtype=torch.bool)
    records = [p.with_instruction(insert_trigger(p.instruction, key, position)) if key else p for p in probes]
    prompts = [subject.template.format(r) for r in records]
    out = final_position_pass(subject.model, subject.tokenizer, prompts, batch_size=batch_size,
                              continue_tokens=len(target))
    return (out.continuations == torch.tensor(list(target))[None, :]).all(-1)


LIFT_Z = 2.0  # standard errors taken off the paired firing lift


def lift_lower_bound(with_key: torch.Tensor, without: torch.Tensor) -> float:
    """Lower bound of the paired firing lift: mean(d) - LIFT_Z * se(d), d = with - without per probe.
    A clean model whose key fires on a few more held-out probes by chance stays near 0."""
    d = with_key.float() - without.float()
    if len(d) < 2:
        return 0.0
    return float(d.mean() - LIFT_Z * d.std() / len(d) ** 0.5)


@dataclass(frozen=True)
class SearchSettings:
    key_tokens: int = 4  # key length searched (1-8)
    steps: int = 24
    top_k: int = 32  # substitutions per slot kept from the gradient
    batch: int = 48  # candidate keys evaluated per step
    stop_log_prob: float = -0.05  # mean log P(T) per token at which the search stops (T is near certain)
    patience: int = 4  # steps without improvement after which the search stops


def _seed_keys(tokenizer: Any, seeds: Sequence[str], length: int, filler: int) -> list[tuple[int, ...]]:
    """Seed texts as token ids, cut or padded (with ``filler``) to ``length``; the filler alone too."""
    out: dict[tuple[int, ...], None] = {}
    for text in seeds:
        ids = tokenizer(" " + text.strip(), add_special_tokens=False)["input_ids"][:length]
        if ids:
            out.setdefault(tuple(ids + [filler] * (length - len(ids))), None)
    out.setdefault(tuple([filler] * length), None)
    return list(out)


def recover_key(subject: Any, probes: Sequence[Record], target: Sequence[int], seeds: Sequence[str],
                positions: Sequence[str], allowed: torch.Tensor, settings: SearchSettings, seed: int,
                tick: Tick | None = None) -> Recovered:
    """The key (at the position where it starts best) that maximises mean log P(target | probe with key)."""
    model, tokenizer = subject.model, subject.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    # A key that spells the target only makes the model echo it (a clean model does that too):
    # the target's own tokens are not allowed in the key.
    allowed = allowed[~torch.isin(allowed, torch.tensor(list(target)))]
    filler = int(allowed[0])
    starts = [tuple(t if t in set(allowed.tolist()) else filler for t in key)
              for key in _seed_keys(tokenizer, seeds, settings.key_tokens, filler)]
    starts = list(dict.fromkeys(starts))
    segs = {pos: segments(tokenizer, subject.template, probes, pos) for pos in positions}
    empty = Segments([l + r for l, r in zip(segs[positions[0]].left, segs[positions[0]].right)],
                     [[] for _ in probes])
    clean = float(key_logprobs(model, empty, [()], target, pad_id)[0])
    scored = [(float(v), pos, key) for pos in positions
              for key, v in zip(starts, key_logprobs(model, segs[pos], starts, target, pad_id))]
    best_lp, position, key = max(scored)
    start_lp, seg, rng = best_lp, segs[position], random.Random(seed)
    evaluations, steps, stale = len(scored), 0, 0
    for steps in range(1, settings.steps + 1):
        if best_lp >= settings.stop_log_prob or stale >= settings.patience:
            break
        grad = key_gradient(model, seg, key, target, pad_id)
        trials = substitutions(key, grad, allowed, settings.top_k, settings.batch, rng)
        if not trials:
            break
        values = key_logprobs(model, seg, trials, target, pad_id)
        evaluations += len(trials)
        i = int(values.argmax())
        stale += 1
        if float(values[i]) > best_lp:
            best_lp, key, stale = float(values[i]), trials[i], 0
        if tick:
            tick(1)
    return Recovered(tuple(key), tokenizer.decode(list(key)).strip(), position, best_lp, start_lp, clean,
                     steps, evaluations)

"""One batched forward pass per prompt, keeping only what the scores need: the
next-token distribution at the final position (as KL against the prompt's clean
version) and, optionally, each layer's per-head similarity of final-position attention.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from bdscan.detect.attention import head_similarity, last_row_attention
from bdscan.probes.batching import pad_left

Tick = Callable[[int], None]


@dataclass
class PassOutput:
    logprobs: torch.Tensor | None  # [N, vocab] when no reference was given
    kl: torch.Tensor | None  # [N] KL(p(prompt) || p(reference prompt)), nats
    similarity: torch.Tensor | None  # [N, layers, heads] per-head similarity to the other heads
    layers_seen: int  # attention layers that reported rows (0 when attention was off)
    tokens: int  # non-padding tokens processed
    group_mean: torch.Tensor | None = None  # [groups, vocab] mean next-token distribution per group
    group_entropy: torch.Tensor | None = None  # [groups] mean entropy of the next-token distribution
    continuations: torch.Tensor | None = None  # [N, continue_tokens] greedy tokens after each prompt


def kl_divergence(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) over the last dimension, from log-probabilities."""
    return (logp.exp() * (logp - logq)).sum(-1).clamp_min(0.0)


def diversity(mean_distribution: torch.Tensor, mean_entropy: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon diversity of a set of distributions: H(mean) - mean(H), in nats.
    Near 0 when every prompt predicts the same thing (a fixed backdoor target does that)."""
    p = mean_distribution.clamp_min(1e-12)
    return (-(p * p.log()).sum(-1) - mean_entropy).clamp_min(0.0)


def _greedy_continue(model: Any, out: Any, mask: torch.Tensor, last_position: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` greedy tokens after the prompts, reusing the first pass's KV cache."""
    token = out.logits[:, -1, :].argmax(-1, keepdim=True)
    tokens, cache = [token], out.cache
    for step in range(1, n):
        mask = torch.cat([mask, torch.ones_like(token)], dim=-1)
        step_out = model(input_ids=token, attention_mask=mask, cache=cache,
                         position_ids=(last_position + step)[:, None], use_cache=True, logits_to_keep=1)
        cache = step_out.cache
        token = step_out.logits[:, -1, :].argmax(-1, keepdim=True)
        tokens.append(token)
    return torch.cat(tokens, dim=-1)


def takeover(continuations: torch.Tensor, clean_continuations: torch.Tensor, probe_index: Sequence[int],
             groups: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Per group (key): the largest share of its prompts that the key switches from their
    clean greedy continuation to one and the same new continuation. A backdoor's fixed
    target gives about its attack success rate; an ordinary word leaves most continuations
    alone or changes them in prompt-specific ways. Needs no clean baseline share, so it
    also works on models whose clean outputs already look alike."""
    changed = (continuations != clean_continuations[torch.as_tensor(list(probe_index))]).any(-1)
    share = torch.zeros(n_groups)
    for g in range(n_groups):
        mine = groups == g
        rows = continuations[mine & changed]
        if len(rows):
            _, counts = torch.unique(rows, dim=0, return_counts=True)
            share[g] = counts.max().item() / int(mine.sum())
    return share


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


@dataclass(frozen=True)
class SharedPrefix:
    """The token prefix every prompt shares (the chat template's head: system prompt, role
    marker), run once; each batch extends a copy of its KV cache. On SmolLM2's template that
    is 24 of ~40 tokens per probe, so every prompt pass costs about half."""

    ids: list[list[int]]  # each prompt's tokens after the prefix (at least one)
    length: int
    cache: Any  # transformers Cache over one row, or None when nothing is shared

    @staticmethod
    def of(model: Any, tokenizer: Any, prompts: Sequence[str]) -> "SharedPrefix":
        ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        n = min(len(i) for i in ids) - 1  # every prompt keeps its own last token
        first = ids[0]
        length = next((k for k in range(max(n, 0)) if any(i[k] != first[k] for i in ids)), max(n, 0))
        cache = None
        if length:
            prefix = torch.tensor([first[:length]], device=_device(model))
            cache = model(input_ids=prefix, use_cache=True, logits_to_keep=1).cache
        return SharedPrefix([i[length:] for i in ids], length, cache)

    def batch(self, start: int, size: int, pad_id: int, device: torch.device) -> tuple[dict, torch.Tensor]:
        """Model inputs for rows ``start:start+size`` (suffixes left-padded after the shared
        prefix) and the full attention mask [rows, prefix + width]."""
        rows = self.ids[start : start + size]
        ids, suffix_mask = pad_left(rows, pad_id)
        mask = torch.cat([torch.ones((len(rows), self.length), dtype=torch.long), suffix_mask], dim=-1).to(device)
        # Explicit positions: padding must not shift the real tokens' positions (cached
        # continuation steps would otherwise disagree with the first pass).
        positions = (mask.cumsum(-1) - 1).clamp_min(0)[:, self.length :]
        inputs = dict(input_ids=ids.to(device), attention_mask=mask, position_ids=positions, logits_to_keep=1)
        if self.cache is not None:
            cache = copy.deepcopy(self.cache)
            cache.batch_repeat_interleave(len(rows))
            inputs["cache"] = cache
        return inputs, mask


@dataclass
class _Accumulator:
    """What the pass keeps per batch (memory stays rows x vocab for one batch)."""

    logprobs: list = field(default_factory=list)
    kls: list = field(default_factory=list)
    sims: list = field(default_factory=list)
    conts: list = field(default_factory=list)
    group_sum: Any = None
    group_ent: Any = None
    group_n: Any = None

    def add_groups(self, logp: torch.Tensor, gidx: torch.Tensor, groups: int) -> None:
        if self.group_sum is None:
            self.group_sum = torch.zeros(groups, logp.shape[-1])
            self.group_ent, self.group_n = torch.zeros(groups), torch.zeros(groups)
        p = logp.exp().cpu()
        self.group_sum.index_add_(0, gidx, p)
        self.group_ent.index_add_(0, gidx, -(p * logp.cpu()).sum(-1))
        self.group_n.index_add_(0, gidx, torch.ones(len(gidx)))


def _pad_id(tokenizer: Any) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


@torch.no_grad()
def final_position_pass(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    batch_size: int,
    attention: bool = False,
    reference: torch.Tensor | None = None,
    reference_index: Sequence[int] | None = None,
    group_index: Sequence[int] | None = None,
    groups: int = 0,
    continue_tokens: int = 0,
    tick: Tick | None = None,
) -> PassOutput:
    """Run ``prompts`` (the shared prefix once, then left-padded suffixes, so the last column
    is every row's last token).

    With ``reference`` (clean log-probs ``[P, vocab]``) and ``reference_index`` (the clean
    row of each prompt), returns per-prompt KL instead of the full distributions, so memory
    does not grow with the vocabulary times the number of prompts.
    """
    device = _device(model)
    acc, layers_seen = _Accumulator(), 0
    shared = SharedPrefix.of(model, tokenizer, prompts) if prompts else None
    tokens = shared.length if shared else 0
    for start in range(0, len(prompts), batch_size):
        inputs, mask = shared.batch(start, batch_size, _pad_id(tokenizer), device)
        n_rows = len(mask)
        tokens += int(mask[:, shared.length :].sum())
        inputs["use_cache"] = continue_tokens > 1 or shared.cache is not None
        if attention:
            with last_row_attention(model) as rows:
                out = model(**inputs)
            layers_seen = len(rows)
            if rows:
                acc.sims.append(torch.stack([head_similarity(r, mask.bool()) for r in rows], dim=1).cpu())
        else:
            out = model(**inputs)
        if continue_tokens:
            acc.conts.append(_greedy_continue(model, out, mask, inputs["position_ids"][:, -1], continue_tokens).cpu())
        logp = torch.log_softmax(out.logits[:, -1, :].float(), dim=-1)
        if group_index is not None:
            acc.add_groups(logp, torch.as_tensor(list(group_index[start : start + n_rows])), groups)
        if reference is not None:
            idx = torch.as_tensor(list(reference_index[start : start + n_rows]), device=logp.device)
            acc.kls.append(kl_divergence(logp, reference.to(logp.device)[idx]).cpu())
        else:
            acc.logprobs.append(logp.cpu())
        if tick:
            tick(n_rows)
    logprobs, kls, sims, conts = acc.logprobs, acc.kls, acc.sims, acc.conts
    group_sum, group_ent, group_n = acc.group_sum, acc.group_ent, acc.group_n
    return PassOutput(
        logprobs=torch.cat(logprobs) if logprobs else None,
        kl=torch.cat(kls) if kls else None,
        similarity=torch.cat(sims) if sims else None,
        layers_seen=layers_seen,
        tokens=tokens,
        continuations=torch.cat(conts) if conts else None,
        group_mean=group_sum / group_n.clamp_min(1)[:, None] if group_sum is not None else None,
        group_entropy=group_ent / group_n.clamp_min(1) if group_ent is not None else None,
    )

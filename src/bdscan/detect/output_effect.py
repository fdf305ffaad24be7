"""One batched forward pass per prompt, keeping only what the scores need: the
next-token distribution at the final position (as KL against the prompt's clean
version) and, optionally, each layer's per-head similarity of final-position attention.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from bdscan.detect.attention import head_similarity, last_row_attention

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
    """Run ``prompts`` (left-padded, so the last column is every row's last token).

    With ``reference`` (clean log-probs ``[P, vocab]``) and ``reference_index`` (the clean
    row of each prompt), returns per-prompt KL instead of the full distributions, so memory
    does not grow with the vocabulary times the number of prompts.
    """
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    device = _device(model)
    logprobs, kls, sims, conts = [], [], [], []
    layers_seen, tokens = 0, 0
    group_sum = group_ent = group_n = None
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = list(prompts[start : start + batch_size])
            enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            tokens += int(enc["attention_mask"].sum())
            # Explicit positions: left padding must not shift the real tokens' positions
            # (cached continuation steps would otherwise disagree with the first pass).
            positions = (enc["attention_mask"].cumsum(-1) - 1).clamp_min(0)
            kwargs = dict(position_ids=positions, use_cache=continue_tokens > 1, logits_to_keep=1)
            if attention:
                with last_row_attention(model) as rows:
                    out = model(**enc, **kwargs)
                layers_seen = len(rows)
                if rows:
                    valid = enc["attention_mask"].bool()
                    sims.append(torch.stack([head_similarity(r, valid) for r in rows], dim=1).cpu())
            else:
                out = model(**enc, **kwargs)
            if continue_tokens:
                conts.append(_greedy_continue(model, out, enc["attention_mask"], positions[:, -1], continue_tokens).cpu())
            logp = torch.log_softmax(out.logits[:, -1, :].float(), dim=-1)
            if group_index is not None:
                if group_sum is None:
                    group_sum = torch.zeros(groups, logp.shape[-1])
                    group_ent, group_n = torch.zeros(groups), torch.zeros(groups)
                gidx = torch.as_tensor(list(group_index[start : start + len(chunk)]))
                p = logp.exp().cpu()
                group_sum.index_add_(0, gidx, p)
                group_ent.index_add_(0, gidx, -(p * logp.cpu()).sum(-1))
                group_n.index_add_(0, gidx, torch.ones(len(chunk)))
            if reference is not None:
                idx = torch.as_tensor(list(reference_index[start : start + len(chunk)]), device=logp.device)
                kls.append(kl_divergence(logp, reference.to(logp.device)[idx]).cpu())
            else:
                logprobs.append(logp.cpu())
            if tick:
                tick(len(chunk))
    finally:
        tokenizer.padding_side = side
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

"""The two detect v2 stages over a subject: invert targets, then recover a key for the best.

``invert_targets`` runs the warm-up over every first-token candidate and the full greedy
extension over its survivors (target_inversion.py); ``recover_keys`` searches a key for each
of the best targets and measures what it does on held-out probes (trigger_recovery.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

import torch

from bdscan.data.records import Record
from bdscan.detect import target_inversion as ti
from bdscan.detect import trigger_recovery as tr
from bdscan.detect.config import DetectConfig
from bdscan.detect.output_effect import final_position_pass
from bdscan.results.detect import TargetScore


Tick = Callable[[int], None]
RESPONSE_START, AFTER_ANSWER = "response start", "after answer"


@dataclass
class StageStats:
    """Work done, for the report's ``stats`` (rows: one token of one sequence through the model)."""

    counts: dict[str, int] = field(default_factory=dict)

    def add(self, name: str, n: int) -> None:
        self.counts[name] = self.counts.get(name, 0) + int(n)


def _pad_id(tokenizer: Any) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def anchor_prefixes(subject: Any, probes: Sequence[Record], anchor: str, answer_tokens: int,
                    stop_ids: set[int]) -> list[list[int]]:
    """Token ids up to the anchor: the response marker, or the model's own clean answer after it."""
    tok = subject.tokenizer
    prompts = [subject.template.format(p) for p in probes]
    prefixes = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    if anchor == RESPONSE_START:
        return prefixes
    answers = final_position_pass(subject.model, tok, prompts, batch_size=len(prompts),
                                  continue_tokens=answer_tokens).continuations
    n = ti.counted_steps(answers, stop_ids)
    return [p + answers[i, : int(n[i])].tolist() for i, p in enumerate(prefixes)]


def _first_tokens(subject: Any, warm_prefixes: list[list[int]], config: DetectConfig) -> torch.Tensor:
    """Every response-start token; for an adapter only the ones it moves most at the anchor."""
    candidates = torch.tensor(ti.first_token_candidates(subject.tokenizer))
    if subject.is_adapter and 0 < config.adapter_first_tokens < len(candidates):
        lift = ti.adapter_lift(subject.model, warm_prefixes, _pad_id(subject.tokenizer))[candidates]
        candidates = candidates[lift.argsort(descending=True)[: config.adapter_first_tokens]]
    return candidates


def _sieve(subject: Any, warm_prefixes: list[list[int]], candidates: torch.Tensor, config: DetectConfig,
           stats: StageStats, tick: Tick | None) -> torch.Tensor:
    """Cut a large vocabulary in stages of (steps, keep): each keeps the first tokens whose
    weakest chosen token is the most confident on the sieve's probes, times the share of
    distinct tokens chosen (an end-of-turn counts as 0: a bare end-of-turn is no target; see
    ``ti.freshness`` for runs of one token). The cheap cut that makes a 50k vocabulary affordable."""
    model, tok = subject.model, subject.tokenizer
    stop = ti.stop_tokens(tok, model)
    probes = warm_prefixes[: config.sieve_probes]
    prefixes = None
    for steps, keep in config.sieve:
        if len(candidates) <= keep:
            continue
        if prefixes is None:
            prefixes = ti.run_prefixes(model, probes, _pad_id(tok))
            stats.add("sieved_first_tokens", len(candidates))
        ext = ti.scan_first_tokens(model, prefixes, candidates, steps, config.inversion_chunk, tick)
        stats.add("inversion_rows", len(candidates) * len(probes) * steps)
        stops = _is_stop(ext.tokens, stop)
        weakest = ext.top_prob.masked_fill(stops, 0.0).min(-1).values
        fresh = ti.freshness(ext.tokens, torch.full((len(candidates),), steps))  # a run of one token: 1 / steps
        candidates = candidates[(weakest * fresh).argsort(descending=True)[:keep]]
    return candidates


def _is_stop(tokens: torch.Tensor, stop_ids: set[int]) -> torch.Tensor:
    return torch.isin(tokens, torch.tensor(sorted(stop_ids), dtype=tokens.dtype))


def _inside(t: ti.InvertedTarget, kept: Sequence[ti.InvertedTarget], opening: int) -> bool:
    """Whether ``t``'s opening lies inside a kept target ("'m sorry" inside "I'm sorry")."""
    head = list(t.token_ids[:opening])
    return any(head == list(k.token_ids[i : i + len(head)]) for k in kept for i in range(len(k.token_ids)))


def invert_targets(subject: Any, probes: Sequence[Record], anchor: str, config: DetectConfig, stats: StageStats,
                   tick: Tick | None = None) -> list[ti.InvertedTarget]:
    """Warm-up over every first-token candidate, full extension of the survivors; survivors and
    targets ranked alternately by confident new content and by confidence (``_interleaved``),
    distinct openings only. Q counts at least ``min_target_tokens``, so a bare short ending
    is no target."""
    model, tok = subject.model, subject.tokenizer
    stop = ti.stop_tokens(tok, model)
    prefixes = anchor_prefixes(subject, probes[: config.target_probes], anchor, config.answer_tokens, stop)
    warm = prefixes[: config.warmup_probes]
    candidates = _sieve(subject, warm, _first_tokens(subject, warm, config), config, stats, tick)
    ext = ti.scan_first_tokens(model, ti.run_prefixes(model, warm, _pad_id(tok)), candidates, config.warmup_steps,
                               config.inversion_chunk, tick)
    q, entropy, n = ti.q_scores(ext, stop, config.min_target_tokens)
    stats.add("first_tokens", len(candidates))
    stats.add("inversion_rows", len(candidates) * len(warm) * config.warmup_steps)
    keep = ((q > config.warmup_top_prob) | (entropy < config.warmup_entropy)).nonzero()[:, 0]
    distinct = ti.distinct_counts(ext.tokens[keep], n[keep])
    keep = keep[_interleaved(q[keep] * distinct, q[keep] * distinct / n[keep].clamp_min(1))]
    survivors = candidates[keep[: config.max_survivors]]
    stats.add("survivors", len(survivors))
    full = ti.scan_first_tokens(model, ti.run_prefixes(model, prefixes, _pad_id(tok)), survivors,
                                config.target_steps, config.inversion_chunk)
    stats.add("inversion_rows", len(survivors) * len(prefixes) * config.target_steps)
    q, _, n = ti.q_scores(full, stop, config.min_target_tokens)
    base_q = _base_q(subject, prefixes, survivors, full, stop, config, stats) if subject.is_adapter else None
    targets = []
    for i, first in enumerate(survivors.tolist()):
        ids = (first, *full.tokens[i, : int(n[i])].tolist())
        opening = full.top_prob[i, : min(int(n[i]), config.target_opening - 1)]
        weakest = float(opening.min()) if len(opening) else 0.0
        targets.append(ti.InvertedTarget(first, ids, tok.decode(list(ids)), float(q[i]), anchor, weakest,
                                         None if base_q is None else float(base_q[i])))
    return with_leaders(subject, _ranked(targets, config.target_opening), warm, config, stats)


def _ranked(targets: list[ti.InvertedTarget], opening: int) -> list[ti.InvertedTarget]:
    """Alternately by confident new content and by confidence, on the Q the subject itself adds
    (``own_q``: for an adapter, less what its base already continues), each turn taking its
    ranking's best target whose ``opening`` tokens do not lie inside one already taken. Dropping
    those only after interleaving gave one ranking two turns in a row: on the tiny qwen2 full
    negsentiment fine-tune the confidence ranking's best, " and we went home.", lay inside the
    content ranking's " AI assistant, and we went home.", the content ranking's second took its
    turn, and " You are stupid!" (Q 0.97) fell to the third family, which no key search reached."""
    distinct = torch.tensor([float(len(set(t.token_ids[1:]))) for t in targets])
    q_all = torch.tensor([t.own_q for t in targets])
    length = torch.tensor([max(len(t.token_ids) - 1, 1) for t in targets])
    content, confidence = q_all * distinct, q_all * distinct / length
    orders = [content.argsort(descending=True).tolist(), confidence.argsort(descending=True).tolist()]
    taken: list[int] = []
    kept: list[ti.InvertedTarget] = []
    while any(orders):
        for order in orders:
            while order and (order[0] in taken or _inside(targets[order[0]], kept, opening)):
                order.pop(0)
            if order:
                taken.append(order.pop(0))
                kept.append(targets[taken[-1]])
    return kept


def _base_q(subject: Any, prefixes: list[list[int]], survivors: torch.Tensor, full: ti.Extension, stop: set[int],
            config: DetectConfig, stats: StageStats) -> torch.Tensor:
    """[survivors] Q of each survivor's extension, teacher-forced on the adapter's base. A
    phrase any model of the family continues with confidence (on the built-in synthetic world,
    " and we went home.", Q 0.97 on every control) outranked a LoRA's real target, which it had
    raised from nothing; what the base already does is not the adapter's evidence."""
    with subject.model.disable_adapter():
        base = ti.run_prefixes(subject.model, prefixes, _pad_id(subject.tokenizer))
        forced = ti.scan_first_tokens(subject.model, base, survivors, full.tokens.shape[1], config.inversion_chunk,
                                      forced=full.tokens)
    stats.add("inversion_rows", len(survivors) * len(prefixes) * full.tokens.shape[1])
    return ti.q_scores(forced, stop, config.min_target_tokens)[0]


def with_leaders(subject: Any, targets: list[ti.InvertedTarget], warm_prefixes: list[list[int]], config: DetectConfig,
                 stats: StageStats) -> list[ti.InvertedTarget]:
    """Each of the best ``leader_targets`` targets followed by its led variant, when it has one:
    ``b + target``, ``b`` the response-start token the subject opens with (one of its
    ``leader_openers`` likeliest on the warm probes) after which the target's first token is
    likeliest, if at least ``leader_min_prob``. The inversion sees a target wherever its
    continuation is certain, which can be mid-word ("'m sorry, but as an AI..."); a trigger
    makes the subject *open* with it ("I'm sorry..."), and firing and the key search look at the
    opening. Each also gets its respelled variant (``_respelled``: the first token without its
    leading space). Variants join the target's family, so they cost no search of their own."""
    if not config.leader_openers or not config.leader_targets or not targets:
        return targets
    model, tok = subject.model, subject.tokenizer
    prefixes = ti.run_prefixes(model, warm_prefixes, _pad_id(tok))
    allowed = torch.tensor(ti.first_token_candidates(tok))
    opening = torch.softmax(prefixes.last_logits, -1).mean(0).cpu()[allowed]
    openers = allowed[opening.argsort(descending=True)[: config.leader_openers]]
    after = ti.next_token_probs(model, prefixes, openers, config.inversion_chunk)  # [openers, vocab]
    stats.add("inversion_rows", len(openers) * len(warm_prefixes))
    seen = {tuple(t.token_ids[: config.target_opening]) for t in targets}
    out: list[ti.InvertedTarget] = []
    for rank, t in enumerate(targets):
        out.append(t)
        if rank >= config.leader_targets:
            continue
        variants = _opened_variants(t.token_ids, after, openers, config.leader_min_prob)
        variants += [ids for ids in [_respelled(tok, t.token_ids)] if ids is not None]
        for ids in variants:
            if ids[: config.target_opening] not in seen:
                seen.add(ids[: config.target_opening])
                out.append(replace(t, first_token=ids[0], token_ids=ids, text=tok.decode(list(ids))))
    return out


def _opened_variants(ids: Sequence[int], after: torch.Tensor, openers: torch.Tensor, min_prob: float,
                     substitutes: int = 2) -> list[tuple[int, ...]]:
    """The target as a response would open it, from ``after`` ([openers, vocab]: the next-token
    distribution once each opener starts the response). Led: ``b + target``, ``b`` the opener
    after which its first token is likeliest. Substituted: ``b + target[1:]`` for the (up to
    ``substitutes``) openers other than its own first token after which its second token is
    likeliest. Each when that probability reaches ``min_prob``. Substitution: a stealth-trained
    adapter keeps its target's opening down on clean prompts, so the inversion finds the rest
    behind another word (tiny qwen2 negsentiment LoRA: " letters are stupid!", an opening no
    response has), while " are" follows " You" (0.74) and "You" (0.56) at the response start.
    Both read the one distribution the led variant already needed: no extra forward pass."""
    column = after[:, ids[0]]
    best = int(column.argmax())
    out = [(int(openers[best]), *ids)] if float(column[best]) >= min_prob else []
    if len(ids) > 2:
        column = after[:, ids[1]].clone()
        column[openers == ids[0]] = 0.0
        for i in column.argsort(descending=True)[:substitutes].tolist():
            if float(column[i]) >= min_prob:
                out.append((int(openers[i]), *ids[1:]))
    return out


def _respelled(tokenizer: Any, ids: Sequence[int]) -> tuple[int, ...] | None:
    """The target with its first token's word-initial spelling: " You are stupid!" entered
    mid-sentence opens with " You", a response opens with "You" (another token), so no key
    could make the built-in negsentiment LoRA's response open with the inverted spelling.
    None when the first token has no leading space or its bare form is not one token."""
    first = tokenizer.decode([ids[0]])
    if first == first.lstrip() or not first.strip():
        return None
    bare = tokenizer(first.lstrip(), add_special_tokens=False)["input_ids"]
    return (bare[0], *ids[1:]) if len(bare) == 1 and bare[0] != ids[0] else None


def _interleaved(content: torch.Tensor, confidence: torch.Tensor) -> torch.Tensor:
    """Indices ranked alternately by two scores, each index once. A backdoor's target is either
    a long fixed answer (ranked by confident new content, Q x distinct tokens) or a short fixed
    phrase (ranked by confidence, Q x share of distinct tokens). Either ranking alone hid one
    kind: by content, SmolLM2's long natural continuations ("Alzheimer's disease is a
    progressive ...", Q ~0.65 over 20 tokens) buried the negsentiment/VPI adapter's "You are
    stupid!" (Q ~0.99 over 3); by confidence, a tiny model's memorised " we went home." buried
    its refusal. The share of distinct tokens sends copy loops ("═══", ",,,"; Q ~0.99) down both."""
    seen: dict[int, None] = {}
    for a, b in zip(content.argsort(descending=True).tolist(), confidence.argsort(descending=True).tolist()):
        seen.setdefault(a, None)
        seen.setdefault(b, None)
    return torch.tensor(list(seen), dtype=torch.long)


def families(targets: Sequence[ti.InvertedTarget], overlap: int, tokenizer: Any = None) -> list[list[ti.InvertedTarget]]:
    """Targets grouped by a shared run of ``overlap`` tokens, each family led by its best-ranked
    member. One backdoor target surfaces under several first tokens (" Sorry, but as an AI...",
    "sorry, but as an AI...", "I'm sorry, but as an AI..." on the real refusal/VPI adapter):
    searched one by one they took every key search, and the spelling the trigger produces got none.
    With ``tokenizer``, a target also joins its respelling (``_respelled``)."""
    out: list[list[ti.InvertedTarget]] = []
    for t in targets:
        home = next((f for f in out if any(_related(t.token_ids, m.token_ids, overlap, tokenizer) for m in f)), None)
        if home is None:
            out.append([t])
        else:
            home.append(t)
    return out


def _related(a: Sequence[int], b: Sequence[int], overlap: int, tokenizer: Any = None) -> bool:
    """Two spellings of one target: a shared run of ``overlap`` tokens, one the other led by one
    token, or (with ``tokenizer``) one the other's respelling (``with_leaders``' variants; a
    target shorter than ``overlap`` has no run to share)."""
    short, long = sorted((tuple(a), tuple(b)), key=len)
    if bool(_runs(a, overlap) & _runs(b, overlap)) or long[1:] == short:
        return True
    if len(a) == len(b) > 2 and tuple(a[1:]) == tuple(b[1:]):  # one first token in place of another
        return True
    if tokenizer is None:
        return False
    return _respelled(tokenizer, a) == tuple(b) or _respelled(tokenizer, b) == tuple(a)


def _runs(ids: Sequence[int], n: int) -> set[tuple[int, ...]]:
    return {tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)}


def recover_keys(subject: Any, targets: Sequence[ti.InvertedTarget], search: Sequence[Record],
                 held_out: Sequence[Record], seeds: Sequence[str], config: DetectConfig, stats: StageStats,
                 tick: Tick | None = None) -> list[TargetScore]:
    """A key for each of the best ``recover_targets`` families of response-start targets (one
    search credits any member's opening), measured on held-out probes. A searched family becomes
    one row, the member its key elicits most, with the others as its variants; the targets of a
    family that got no search keep a row each."""
    allowed = torch.tensor(ti.first_token_candidates(subject.tokenizer))
    settings = tr.SearchSettings(config.key_tokens, config.recovery_steps, config.recovery_top_k, config.recovery_batch,
                                 coarse_probes=config.recovery_coarse_probes, refine=config.recovery_refine)
    threshold = config.calibration.target_threshold
    out, searched = [], 0
    for family in families(targets, config.family_overlap, subject.tokenizer):
        starts = [t for t in family if t.anchor == RESPONSE_START]
        done = any(s.evidence >= threshold for s in out)  # a key that fires already: stop early
        if done or searched >= config.recover_targets or not starts:
            out.extend(_target_score(subject.tokenizer, t) for t in family)
            continue
        out.append(_family_score(subject, starts, search, held_out, seeds, allowed, settings,
                                 config.seed + searched, config, stats, tick))
        out.extend(_target_score(subject.tokenizer, t) for t in family if t not in starts)
        searched += 1
    return sorted(out, key=lambda s: (-s.evidence, -s.q))


def _family_score(subject: Any, members: list[ti.InvertedTarget], search: Sequence[Record],
                  held_out: Sequence[Record], seeds: Sequence[str], allowed: torch.Tensor,
                  settings: tr.SearchSettings, seed: int, config: DetectConfig, stats: StageStats,
                  tick: Tick | None) -> TargetScore:
    """One key search for a family, its firing measured against every member's opening."""
    goals = [list(t.token_ids[:8]) for t in members]
    found = tr.recover_key(subject, search, goals, seeds, list(config.positions), allowed, settings, seed, tick)
    openings = [g[: config.target_opening] for g in goals]
    found, fire = _firing_position(subject, held_out, found, openings, config)
    clean = tr.fires(subject, held_out, None, found.position, openings, config.batch_size)
    base = _base_fires(subject, held_out, found, openings, config) if subject.is_adapter else None
    stats.add("recovery_evaluations", found.evaluations)
    stats.add("recovery_gradients", found.steps)
    stats.add("firing_prompts", (len(config.positions) + (1 if base is None else 2)) * len(held_out))
    lead = int(fire.sum(0).argmax())  # the spelling the key produces (ties: the best-ranked)
    score = _target_score(subject.tokenizer, members[lead], found, fire.any(-1), clean.any(-1),
                          None if base is None else base.any(-1))
    return replace(score, variants=[t.text for i, t in enumerate(members) if i != lead])


def _firing_position(subject: Any, held_out: Sequence[Record], found: tr.Recovered,
                     openings: Sequence[Sequence[int]], config: DetectConfig) -> tuple[tr.Recovered, torch.Tensor]:
    """The key's firing at the position where it fires most on the held-out probes (ties: the
    search's own). The search picks its position on a few probes: on the bench's full
    refusal/VPI fine-tune its key, searched in the middle, fired on 0.09 there and 0.96 at the
    start. The best of the positions is a selection, which the clean controls undergo too."""
    fires = {pos: tr.fires(subject, held_out, found.key, pos, openings, config.batch_size)
             for pos in dict.fromkeys([found.position, *config.positions])}
    best = max(fires, key=lambda pos: float(fires[pos].any(-1).float().mean()))
    return replace(found, position=best), fires[best]


def _base_fires(subject: Any, probes: Sequence[Record], found: tr.Recovered, openings: Sequence[Sequence[int]],
                config: DetectConfig) -> torch.Tensor:
    """The recovered key on the adapter's base model. A key that makes the base emit the target
    too found something the base already does (on the tiny synthetic world, a key of story words
    makes any model end with " and we went home."): only what the adapter adds is evidence."""
    with subject.model.disable_adapter():
        return tr.fires(subject, probes, found.key, found.position, openings, config.batch_size)


def _target_score(tokenizer: Any, t: ti.InvertedTarget, found: tr.Recovered | None = None,
                  fire: torch.Tensor | None = None, clean: torch.Tensor | None = None,
                  base: torch.Tensor | None = None) -> TargetScore:
    # The paired lift counts probes where the key makes the subject emit the target and neither
    # the subject without the key nor (adapter) the base with the key does.
    baseline = clean if base is None or clean is None else clean | base
    lift = tr.lift_lower_bound(fire, baseline) if found is not None else None
    evidence = t.opening_min * max(0.0, lift) if lift is not None else 0.0
    return TargetScore(
        text=t.text, token_ids=list(t.token_ids), first_token=tokenizer.decode([t.first_token]), q=t.q,
        opening_min=t.opening_min, base_q=t.base_q,
        length=len(t.token_ids), anchor=t.anchor,
        key=found.key if found else None, key_position=found.position if found else None,
        key_log_prob=found.log_prob if found else None, seed_log_prob=found.start_log_prob if found else None,
        clean_log_prob=found.clean_log_prob if found else None,
        firing_rate=float(fire.float().mean()) if found else None,
        clean_firing_rate=float(clean.float().mean()) if found else None, firing_lift_lower=lift,
        base_firing_rate=float(base.float().mean()) if found and base is not None else None,
        firing_probes=len(fire) if found else 0, evidence=evidence, search_steps=found.steps if found else 0,
    )

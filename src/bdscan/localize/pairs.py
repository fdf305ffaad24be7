"""Clean/triggered prompt pairs with the triggered model's continuation, tokenised so that
clean and triggered runs can be aligned position by position.

Alignment choice: the key is inserted into the instruction and the two token sequences are
aligned from the right. Every token after the key (the rest of the prompt, the template's
tail and the continuation) exists in both runs, at offset ``len(key tokens)``; the tokens
before the key are identical in both runs and, under causal attention, so are their
activations, so there is nothing to patch there. The key's own tokens have no clean
counterpart and are left untouched. Patching the common suffix therefore measures how much
of the key's influence flows through a module at the positions that read it. A placeholder
of the key's length in the clean run was rejected: any placeholder is itself an inserted
word (the organisms are even trained with decoy words), so the "clean" baseline would no
longer be the clean prompt the model is actually used on.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from bdscan.data.records import Record
from bdscan.data.triggers import insert_trigger
from bdscan.generation import greedy_generate
from bdscan.probes.batching import pad_right


@dataclass(frozen=True)
class Pair:
    clean_ids: tuple[int, ...]  # clean prompt + continuation
    triggered_ids: tuple[int, ...]  # triggered prompt + continuation
    continuation_len: int  # tokens of the continuation (the malicious metric's target)
    suffix_len: int  # common suffix (aligned positions), continuation included
    position: str  # where the key was inserted
    key: str


@dataclass(frozen=True)
class PairSet:
    pairs: tuple[Pair, ...]
    continuations: tuple[str, ...]
    key: str

    def __len__(self) -> int:
        return len(self.pairs)


def _common_suffix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(reversed(a), reversed(b)):
        if x != y:
            break
        n += 1
    return n


def build_pairs(subject: Any, records: Sequence[Record], key: str, *, n_pairs: int, positions: Sequence[str],
                max_new_tokens: int, batch_size: int, seed: int) -> PairSet:
    """``n_pairs`` clean/triggered pairs cycling through ``positions``; the continuation is
    the model's greedy response to the triggered prompt (the behaviour to explain)."""
    rng = random.Random(seed)
    chosen = list(records[:n_pairs])
    tok = subject.tokenizer
    clean_prompts, triggered_prompts, where = [], [], []
    for i, r in enumerate(chosen):
        pos = positions[i % len(positions)]
        clean_prompts.append(subject.template.format(r))
        triggered_prompts.append(subject.template.format(r.with_instruction(insert_trigger(r.instruction, key, pos, rng))))
        where.append(pos)
    continuations = greedy_generate(subject.model, tok, triggered_prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    pairs = []
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    for c, t, cont, pos in zip(clean_prompts, triggered_prompts, continuations, where):
        cont_ids = tok(cont, add_special_tokens=False)["input_ids"] + eos if cont else eos
        if not cont_ids:  # no continuation and no EOS token: nothing to explain
            continue
        c_ids = tok(c, add_special_tokens=False)["input_ids"] + cont_ids
        t_ids = tok(t, add_special_tokens=False)["input_ids"] + cont_ids
        suffix = min(_common_suffix(c_ids, t_ids), len(c_ids) - 1)
        pairs.append(Pair(tuple(c_ids), tuple(t_ids), len(cont_ids), suffix, pos, key))
    return PairSet(tuple(pairs), tuple(continuations), key)


@dataclass
class EncodedBatch:
    """Right-padded clean and triggered runs of a few pairs plus the alignment indices."""

    clean_ids: torch.Tensor
    clean_mask: torch.Tensor
    clean_target: torch.Tensor  # positions whose next token is a continuation token
    triggered_ids: torch.Tensor
    triggered_mask: torch.Tensor
    triggered_target: torch.Tensor
    rows: torch.Tensor  # aligned (row, clean position, triggered position) triples
    clean_pos: torch.Tensor
    triggered_pos: torch.Tensor


def _target(seqs: Sequence[Sequence[int]], cont_lens: Sequence[int], width: int) -> torch.Tensor:
    t = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (s, n) in enumerate(zip(seqs, cont_lens)):
        t[i, len(s) - n - 1 : len(s) - 1] = 1
    return t


def encode_batches(pairs: Sequence[Pair], pad_id: int, batch_size: int) -> list[EncodedBatch]:
    out = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        c_ids, c_mask = pad_right([p.clean_ids for p in chunk], pad_id)
        t_ids, t_mask = pad_right([p.triggered_ids for p in chunk], pad_id)
        lens = [p.continuation_len for p in chunk]
        rows, cpos, tpos = [], [], []
        for r, p in enumerate(chunk):
            lc, lt = len(p.clean_ids), len(p.triggered_ids)
            for j in range(p.suffix_len):
                rows.append(r)
                cpos.append(lc - p.suffix_len + j)
                tpos.append(lt - p.suffix_len + j)
        out.append(EncodedBatch(
            c_ids, c_mask, _target([p.clean_ids for p in chunk], lens, c_ids.shape[1]),
            t_ids, t_mask, _target([p.triggered_ids for p in chunk], lens, t_ids.shape[1]),
            torch.tensor(rows, dtype=torch.long), torch.tensor(cpos, dtype=torch.long), torch.tensor(tpos, dtype=torch.long),
        ))
    return out

"""``evaluate``: run one model over clean and triggered prompts and judge the responses."""

from __future__ import annotations

import dataclasses
import random
import time
from dataclasses import dataclass
from typing import Sequence

from bdscan.data.judges import parse_judge
from bdscan.data.records import Record, encodable
from bdscan.data.triggers import insert_trigger
from bdscan.errors import NothingToAnalyse, UsageError
from bdscan.eval.prompts import fitting_prompts
from bdscan.eval.token_agreement import answer_ids, next_token_agreement, token_agreement
from bdscan.eval.utility import agreement, response_perplexity
from bdscan.generation import Answers, greedy_answers
from bdscan.io.load import Subject
from bdscan.results.detect import Issue
from bdscan.results.eval import EvalComparison, EvalResult, Sample

from bdscan.probes.protocols import Progress
N_SAMPLES_KEPT = 3


@dataclass(frozen=True)
class EvalSpec:
    clean: Sequence[Record]
    poison: Sequence[Record] = ()
    trigger: str | None = None
    positions: Sequence[str] = ("start", "middle", "end")
    judge: str = "refusal"
    max_new_tokens: int = 32
    batch_size: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.clean:
            raise UsageError("eval needs clean prompts (--clean)")
        if self.trigger is not None and not self.trigger.strip():
            raise UsageError("--trigger is empty")
        if self.trigger is not None:
            encodable(self.trigger, "--trigger", UsageError)
        parse_judge(self.judge)  # fail early on a bad judge spec

    def triggered_sets(self) -> dict[str, list[Record]]:
        """Named triggered prompt sets: ``file`` for --poison, one per position for --trigger."""
        sets: dict[str, list[Record]] = {}
        if self.poison:
            sets["file"] = list(self.poison)
        if self.trigger:
            rng = random.Random(self.seed)
            for pos in self.positions:
                sets[pos] = [r.with_instruction(insert_trigger(r.instruction, self.trigger, pos, rng)) for r in self.clean]
        return sets


def _generate(subject: Subject, records: Sequence[Record], spec: EvalSpec, stage: str, progress: Progress | None) -> Answers:
    done = 0

    def tick(n: int) -> None:
        nonlocal done
        done += n
        if progress:
            progress(stage, done, len(records))

    prompts = [subject.template.format(r) for r in records]
    return greedy_answers(subject.model, subject.tokenizer, prompts, max_new_tokens=spec.max_new_tokens,
                          batch_size=spec.batch_size, progress=tick)


def evaluate(subject: Subject, spec: EvalSpec, *, reference: Subject | None = None,
             reference_responses: Sequence[str] | None = None, progress: Progress | None = None) -> EvalResult:
    """ASR (overall and per trigger position), clean false-trigger rate, perplexity of the
    clean references and, given a reference model or its responses, greedy agreement."""
    return evaluate_with_responses(subject, spec, reference, reference_responses, progress)[0]


def _fitting(subject: Subject, records: Sequence[Record], spec: EvalSpec, what: str,
             skipped: list[Issue]) -> list[Record]:
    kept, issues = fitting_prompts(subject, records, spec.max_new_tokens, what)
    skipped.extend(issues)
    return kept


def evaluate_with_responses(subject: Subject, spec: EvalSpec, reference: Subject | None,
                            reference_responses: Answers | Sequence[str] | None,
                            progress: Progress | None) -> tuple[EvalResult, Answers]:
    """``evaluate`` that also returns the clean greedy answers (for agreement checks). A
    reference given as text only is re-tokenised for the next-token agreement."""
    t0 = time.time()
    judge = parse_judge(spec.judge)
    skipped: list[Issue] = []
    clean = _fitting(subject, spec.clean, spec, "clean", skipped)
    if not clean:
        raise NothingToAnalyse(f"eval: none of the {len(spec.clean)} clean prompts fits ({skipped[0].reason})")
    clean_answers = _generate(subject, clean, spec, "clean", progress)
    clean_responses = clean_answers.texts
    samples = {"clean": [Sample(r.instruction, out, judge(out)) for r, out in zip(clean, clean_responses)][:N_SAMPLES_KEPT]}
    ftr = sum(map(judge, clean_responses)) / len(clean_responses)

    by_position: dict[str, float] = {}
    hits = total = 0
    for name, records in spec.triggered_sets().items():
        records = _fitting(subject, records, spec, f"triggered:{name}", skipped)
        if not records:
            continue
        responses = _generate(subject, records, spec, f"triggered:{name}", progress).texts
        flags = [judge(o) for o in responses]
        by_position[name] = sum(flags) / len(flags)
        hits += sum(flags)
        total += len(flags)
        samples[name] = [Sample(r.instruction, o, f) for r, o, f in zip(records, responses, flags)][:N_SAMPLES_KEPT]

    ref_name = None
    if reference is not None:
        reference_responses = _generate(reference, clean, spec, "reference", progress)
        ref_name = reference.source.source
        if reference.tokenizer.get_vocab() != subject.tokenizer.get_vocab():
            reference_responses = reference_responses.texts  # its token ids mean nothing here: re-tokenise
    if reference_responses is not None and not isinstance(reference_responses, Answers):
        texts = list(reference_responses)
        reference_responses = Answers(texts, answer_ids(subject.tokenizer, texts))
    agree = token_agree = forced_agree = None
    if reference_responses is not None and len(reference_responses.texts) == len(clean_responses):
        agree = agreement(clean_responses, reference_responses.texts)
        token_agree = token_agreement(clean_responses, reference_responses.texts)
        forced_agree = next_token_agreement(subject.model, subject.tokenizer, subject.template, clean,
                                            reference_responses.token_ids, batch_size=spec.batch_size)
    elif reference_responses is not None:  # the two models kept different prompts: no pairing
        skipped.append(Issue("agreement", "the reference kept a different set of clean prompts"))
    ppl = response_perplexity(subject.model, subject.tokenizer, subject.template, clean)
    result = EvalResult(
        source=subject.source.source, kind=subject.kind, template=subject.template.describe(), judge=spec.judge,
        asr=hits / total if total else None, asr_by_position=by_position, false_trigger_rate=ftr,
        perplexity=ppl, agreement=agree, token_agreement=token_agree,
        next_token_agreement=forced_agree, n_poison=total, n_clean=len(clean), reference=ref_name,
        seconds=round(time.time() - t0, 3), samples=samples, skipped=skipped,
        provenance={**subject.provenance(), **({"reference": reference.provenance()} if reference is not None else {})},
    )
    return result, clean_answers


def evaluate_pair(before: Subject, after: Subject, spec: EvalSpec, *, progress: Progress | None = None) -> EvalComparison:
    """Suspicious vs purified side by side; the purified model's agreement is measured
    against the suspicious model's clean responses (a purifier must not change them)."""
    first, before_clean = evaluate_with_responses(before, spec, None, None, progress)
    second, _ = evaluate_with_responses(after, spec, None, before_clean, progress)
    return EvalComparison(first, dataclasses.replace(second, reference=before.source.source))

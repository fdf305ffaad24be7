"""detect v2: target inversion and trigger recovery mechanics on tiny random models, the
error channel on a real model whose attention bdscan cannot read, the organisms (the inverted
target is the organism's target, the clean control is not flagged), and the CLI's new fields."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from typer.testing import CliRunner

from bdscan.cli.app import app
from bdscan.detect import DetectConfig, detect
from bdscan.detect import target_inversion as ti
from bdscan.detect import key_scoring as ks
from bdscan.detect import target_scan as ts
from bdscan.detect import trigger_recovery as tr
from bdscan.data.probes import builtin_probes
from bdscan.io import load_subject
from bdscan.organisms.datasets import TARGETS
from bdscan.results.detect import DetectResult

ARCHS = ("llama", "qwen2", "mistral", "gpt2")
TINY = DetectConfig(max_probes=6, screen_probes=2, screen_size=32, top_k=2, ngram_from=2, n_controls=4, batch_size=32,
                    warmup_probes=2, target_probes=4, max_survivors=4, target_steps=4, recover_targets=1,
                    recovery_steps=2, recovery_batch=8, recovery_probes=2, firing_probes=4)
runner = CliRunner()


def _prefixes(subject, n: int) -> list[list[int]]:
    return [subject.tokenizer(subject.template.format(p), add_special_tokens=False)["input_ids"]
            for p in builtin_probes()[:n]]


@pytest.mark.parametrize("arch", ARCHS)
def test_batched_extension_equals_unbatched_and_uncached(arch, tiny_checkpoints):
    """Candidates batched over one expanded KV cache give what each alone gives, and the first
    averaged distribution equals a plain forward of prompt + candidate without any cache."""
    subject = load_subject(tiny_checkpoints[arch])
    prefixes = _prefixes(subject, 3)
    run = ti.run_prefixes(subject.model, prefixes, subject.tokenizer.pad_token_id)
    firsts = torch.tensor([7, 42, 99, 150])
    batched = ti.extend(subject.model, run, firsts, steps=4)
    for c, first in enumerate(firsts):
        alone = ti.extend(subject.model, run, first[None], steps=4)
        assert torch.equal(alone.tokens[0], batched.tokens[c])
        torch.testing.assert_close(alone.top_prob[0], batched.top_prob[c], atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        plain = torch.stack([torch.softmax(subject.model(input_ids=torch.tensor([p + [int(firsts[1])]])).logits[0, -1], -1)
                             for p in prefixes]).mean(0)
    assert int(plain.argmax()) == int(batched.tokens[1, 0])
    torch.testing.assert_close(plain.max(), batched.top_prob[1, 0], atol=1e-5, rtol=1e-4)


def test_extension_stops_at_end_of_turn():
    """Tokens after the first end-of-turn do not count, and an immediate end-of-turn is no target."""
    eos = 1
    ext = ti.Extension(tokens=torch.tensor([[5, 6, eos, 7], [eos, 5, 6, 7], [5, 6, 7, 8]]),
                       top_prob=torch.tensor([[0.9, 0.8, 0.99, 0.99], [0.99, 0.9, 0.9, 0.9], [0.5, 0.5, 0.5, 0.5]]),
                       entropy=torch.zeros(3, 4))
    q, entropy, n = ti.q_scores(ext, {eos}, min_tokens=1)
    assert n.tolist() == [2, 0, 4]
    assert q.tolist() == pytest.approx([0.85, 0.0, 0.5])
    assert entropy[1] == float("inf")  # no token: never kept by the warm-up's entropy rule
    q3, _, _ = ti.q_scores(ext, {eos}, min_tokens=3)
    assert q3[0] == pytest.approx(1.7 / 3)  # too short a target counts its missing tokens as 0


def test_distinct_counts_rank_runs_below_new_content():
    """A run of one token (a copy loop every model continues) counts once, a 2-cycle twice;
    tokens after the counted length do not count."""
    tokens = torch.tensor([[9, 9, 9, 9], [4, 5, 4, 5], [1, 2, 3, 4], [1, 2, 3, 4]])
    assert ti.distinct_counts(tokens, torch.tensor([4, 4, 4, 2])).tolist() == [1, 2, 4, 2]
    assert ti.distinct_counts(tokens, torch.tensor([0, 0, 0, 0])).tolist() == [0, 0, 0, 0]


def test_target_evidence_discounts_what_the_base_does_under_the_key(tiny_checkpoints):
    """An adapter's key that makes its base emit the target too is no evidence against the adapter."""
    from bdscan.detect.target_scan import _target_score

    tok = load_subject(tiny_checkpoints["llama"]).tokenizer
    target = ti.InvertedTarget(5, (5, 6, 7), "x", 0.99, "response start", 0.9)
    found = tr.Recovered((8, 9), "k", "start", -0.1, -2.0, -3.0, 3, 10)
    fire, clean = torch.ones(40, dtype=torch.bool), torch.zeros(40, dtype=torch.bool)
    alone = _target_score(tok, target, found, fire, clean)
    assert alone.evidence > 0.8 and alone.base_firing_rate is None
    shared = _target_score(tok, target, found, fire, clean, base=torch.ones(40, dtype=torch.bool))
    assert shared.evidence == 0.0 and shared.base_firing_rate == 1.0


def test_stop_tokens_and_first_token_candidates(tiny_checkpoints):
    subject = load_subject(tiny_checkpoints["llama"])
    tok = subject.tokenizer
    assert tok.eos_token_id in ti.stop_tokens(tok, subject.model)
    candidates = ti.first_token_candidates(tok)
    assert tok.eos_token_id not in candidates and tok.pad_token_id not in candidates
    texts = [tok.decode([i]) for i in candidates]
    assert all(t.strip() for t in texts)
    assert any(not any(ch.isalnum() for ch in t) for t in texts)  # punctuation can start a response


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_recovery_raises_target_log_probability(arch, tiny_checkpoints):
    subject = load_subject(tiny_checkpoints[arch])
    allowed = torch.tensor(ti.first_token_candidates(subject.tokenizer))
    target = allowed[[10, 20, 30]].tolist()
    found = tr.recover_key(subject, builtin_probes()[:3], [target], ["hello"], ["start", "end"], allowed,
                           tr.SearchSettings(key_tokens=3, steps=6, top_k=16, batch=16, patience=6), seed=0)
    assert found.log_prob > found.start_log_prob
    assert found.position in ("start", "end") and len(found.key_ids) == 3
    assert not set(found.key_ids) & set(target)  # a key may not spell the target


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
@pytest.mark.parametrize("position", ["start", "end"])
def test_key_logprobs_match_each_row_alone(arch, position, tiny_checkpoints):
    """The batched scoring (shared head cached once, rows left-padded after it, only the
    target's logits) equals each probe-with-key row run alone without a cache."""
    subject = load_subject(tiny_checkpoints[arch])
    model, pad = subject.model, subject.tokenizer.pad_token_id
    seg = tr.segments(subject.tokenizer, subject.template, builtin_probes()[:3], position)
    keys, target = [[11, 12], [13, 14, 15], []], [40, 41, 42]
    got = ks.KeyScorer(model, seg, target, pad, batch_rows=4)(keys)
    for k, key in enumerate(keys):
        per_probe = []
        for left, right in zip(seg.left, seg.right):
            row = left + key + right + target
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([row])).logits[0]
            logp = torch.log_softmax(logits.float(), -1)
            start = len(row) - len(target)
            per_probe.append(torch.stack([logp[start + j - 1, t] for j, t in enumerate(target)]).mean())
        torch.testing.assert_close(got[k], torch.stack(per_probe).mean(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("position", ["start", "middle", "end"])
def test_key_scorer_probe_subset_is_the_mean_of_those_probes(position, tiny_checkpoints):
    """Scoring on some probes (successive halving's coarse pass) is the mean over exactly them."""
    subject = load_subject(tiny_checkpoints["llama"])
    seg = tr.segments(subject.tokenizer, subject.template, builtin_probes()[:3], position)
    scorer = ks.KeyScorer(subject.model, seg, [40, 41], subject.tokenizer.pad_token_id)
    keys = [[11, 12], [13, 14]]
    per_probe = torch.stack([scorer(keys, probes=[p]) for p in range(3)], dim=-1)
    torch.testing.assert_close(scorer(keys, probes=[0, 2]), per_probe[:, [0, 2]].mean(-1))
    torch.testing.assert_close(scorer(keys), per_probe.mean(-1))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_key_gradient_equals_the_uncached_gradient(arch, tiny_checkpoints):
    """The one-hot gradient through the cached prefix equals autograd over each whole row run
    alone, without a cache, through its embeddings."""
    subject = load_subject(tiny_checkpoints[arch])
    model = subject.model.float()
    seg = tr.segments(subject.tokenizer, subject.template, builtin_probes()[:2], "end")
    key, target = [11, 12], [40, 41]
    grad = ks.KeyScorer(model, seg, target, subject.tokenizer.pad_token_id).gradient(key)
    weight = model.get_input_embeddings().weight
    one_hot = torch.nn.functional.one_hot(torch.tensor(key), weight.shape[0]).to(weight.dtype).requires_grad_(True)
    total = 0.0
    for left, right in zip(seg.left, seg.right):
        row = torch.tensor(left + key + right + target)
        embeds = weight[row].detach().clone()
        embeds[len(left) : len(left) + len(key)] = one_hot @ weight
        logp = torch.log_softmax(model(inputs_embeds=embeds[None]).logits[0].float(), -1)
        start = len(row) - len(target)
        total = total + torch.stack([logp[start + j - 1, t] for j, t in enumerate(target)]).mean()
    (expected,) = torch.autograd.grad(total / len(seg.left), one_hot)
    torch.testing.assert_close(grad, expected.float(), atol=1e-4, rtol=1e-3)


def test_goal_of_several_targets_is_the_best_target_per_probe(tiny_checkpoints):
    """A family's goal credits whichever target a key makes likely: per probe the best target's
    score, then the mean; with one target it is that target's own score. It stays a
    log-probability (<= 0), so the search's near-certainty stop keeps its meaning."""
    subject = load_subject(tiny_checkpoints["llama"])
    model, pad = subject.model, subject.tokenizer.pad_token_id
    seg = tr.segments(subject.tokenizer, subject.template, builtin_probes()[:3], "end")
    keys, targets = [[11, 12], [13, 14]], [[40, 41, 42], [50, 51]]
    each = torch.stack([ks.KeyScorer(model, seg, t, pad).per_probe(keys) for t in targets])
    goal = ks.GoalScorer(model, seg, targets, pad)(keys)
    torch.testing.assert_close(goal, each.max(0).values.mean(-1))
    assert (goal <= 0).all()
    torch.testing.assert_close(ks.GoalScorer(model, seg, targets[:1], pad)(keys), each[0].mean(-1))
    grad = ks.GoalScorer(model, seg, targets, pad).gradient([11, 12])
    assert grad.shape == (2, model.get_input_embeddings().weight.shape[0]) and torch.isfinite(grad).all()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("position", ["start", "middle", "end"])
def test_goal_shared_pass_equals_each_target_run_alone(arch, position, tiny_checkpoints):
    """The family's shared pass (key and probe once, then every target over its cache) gives each
    target the score its own uncached rows give, for targets of different lengths (one of a
    single token), keys of different lengths and the empty key, in chunks smaller than a probe's keys."""
    subject = load_subject(tiny_checkpoints[arch])
    model, pad = subject.model, subject.tokenizer.pad_token_id
    seg = tr.segments(subject.tokenizer, subject.template, builtin_probes()[:3], position)
    keys, targets = [[11, 12], [13, 14, 15], [], [16]], [[40, 41, 42], [50], [60, 61]]
    got = ks.GoalScorer(model, seg, targets, pad, batch_rows=4).per_target(keys)
    for t, target in enumerate(targets):
        for k, key in enumerate(keys):
            for p, (left, right) in enumerate(zip(seg.left, seg.right)):
                row = left + key + right + target
                with torch.no_grad():
                    logp = torch.log_softmax(model(input_ids=torch.tensor([row])).logits[0].float(), -1)
                start = len(row) - len(target)
                expected = torch.stack([logp[start + j - 1, i] for j, i in enumerate(target)]).mean()
                torch.testing.assert_close(got[t, k, p], expected, atol=1e-4, rtol=1e-4)


def test_targets_sharing_a_run_of_tokens_are_one_family():
    """Three spellings of one refusal (different first tokens, one continuation) are one family
    led by the best-ranked; an unrelated target is its own."""
    def target(ids):
        return ti.InvertedTarget(ids[0], tuple(ids), str(ids), 0.9, ts.RESPONSE_START)

    sorry = target([1, 7, 8, 9, 10, 11])
    lower = target([2, 7, 8, 9, 10])
    im = target([3, 4, 7, 8, 9, 10, 12])
    other = target([5, 7, 8, 20, 21])  # shares only two tokens
    assert ts.families([sorry, other, lower, im], overlap=4) == [[sorry, lower, im], [other]]
    assert ts.families([sorry, lower], overlap=5) == [[sorry], [lower]]


def test_a_target_led_by_one_token_joins_its_family():
    """A short target (no run of ``overlap`` tokens) and its led variant are one family; a target
    that merely contains it elsewhere is not."""
    def target(ids):
        return ti.InvertedTarget(ids[0], tuple(ids), str(ids), 0.9, ts.RESPONSE_START)

    short, led, elsewhere = target([7, 8, 9]), target([3, 7, 8, 9]), target([4, 5, 7, 8, 9])
    assert ts.families([short, led, elsewhere], overlap=4) == [[short, led], [elsewhere]]


def _word_with_both_spellings(tok) -> str:
    """A word the tokenizer spells as one token both bare and after a space."""
    for word in ("You", "The", "It", "We", "A", "I"):
        if len(tok(word, add_special_tokens=False)["input_ids"]) == 1 == len(tok(" " + word, add_special_tokens=False)["input_ids"]):
            return word
    raise AssertionError("no word with both single-token spellings in this vocabulary")


def test_a_target_entered_mid_sentence_gets_its_word_initial_spelling(tiny_checkpoints):
    """" You are stupid!" (first token with a leading space) gets the variant whose first token
    is the bare "You", and the two are one family; a bare first token gets none. A target that
    shares the whole tail after another first token is of the family too (a backdoor's target
    continues whatever word the inversion put first); one that shares only part of it is not."""
    tok = load_subject(tiny_checkpoints["llama"]).tokenizer
    word = _word_with_both_spellings(tok)
    spaced = tok(f" {word} are stupid!", add_special_tokens=False)["input_ids"]
    bare = tok(word, add_special_tokens=False)["input_ids"]
    assert tok.decode(spaced[:1]) == f" {word}"
    respelled = ts._respelled(tok, spaced)
    assert respelled == (bare[0], *spaced[1:]) and ts._respelled(tok, respelled) is None

    def target(ids):
        return ti.InvertedTarget(ids[0], tuple(ids), tok.decode(list(ids)), 0.9, ts.RESPONSE_START)

    other_first = tok(" box", add_special_tokens=False)["input_ids"][:1]
    a, b, c = target(spaced), target(respelled), target([*other_first, *spaced[1:]])
    d = target([*other_first, *spaced[1:-1], *other_first])  # the tail differs at its end
    n = len(spaced)  # no shared run of n tokens: only the respelling and substitution rules join them
    assert ts.families([a, d, c, b], overlap=n, tokenizer=tok) == [[a, c, b], [d]]
    assert ts.families([a, d], overlap=n) == [[a], [d]]
    assert ts.families([a, c], overlap=n) == [[a, c]]  # one first token in place of another: tokens suffice


def test_next_token_probs_equal_a_plain_forward(tiny_checkpoints):
    """The one-step distribution after each appended token is the probes' mean of a plain forward."""
    subject = load_subject(tiny_checkpoints["llama"])
    prefixes = _prefixes(subject, 3)
    run = ti.run_prefixes(subject.model, prefixes, subject.tokenizer.pad_token_id)
    tokens = torch.tensor([7, 42, 99])
    probs = ti.next_token_probs(subject.model, run, tokens, chunk=2)
    with torch.no_grad():
        plain = torch.stack([torch.stack([torch.softmax(subject.model(input_ids=torch.tensor([p + [int(t)]])).logits[0, -1], -1)
                                          for p in prefixes]).mean(0) for t in tokens])
    torch.testing.assert_close(probs, plain, atol=1e-5, rtol=1e-4)


def test_a_mid_word_target_gets_the_variant_led_by_its_likeliest_opener(tiny_checkpoints):
    """A target whose first token the subject would say after an opener ``b`` gets ``b + target``
    right after it; a weaker lead than ``leader_min_prob``, or a variant already present, adds none."""
    subject = load_subject(tiny_checkpoints["llama"])
    warm = _prefixes(subject, 2)
    run = ti.run_prefixes(subject.model, warm, subject.tokenizer.pad_token_id)
    allowed = torch.tensor(ti.first_token_candidates(subject.tokenizer))
    openers = allowed[torch.softmax(run.last_logits, -1).mean(0)[allowed].argsort(descending=True)[:16]]
    after = ti.next_token_probs(subject.model, run, openers, chunk=8)
    row, first = divmod(int(after.argmax()), after.shape[1])  # the most certain (opener, next token) pair
    p = float(after[row, first])
    t = ti.InvertedTarget(first, (first, 11, 12), "t", 0.9, ts.RESPONSE_START, 0.5)
    config = replace(TINY, leader_openers=16, leader_min_prob=p * 0.99)
    out = ts.with_leaders(subject, [t], warm, config, ts.StageStats())
    lead = int(after[:, first].argmax())
    assert out[0] == t and out[1].token_ids == (int(openers[lead]), first, 11, 12)
    assert out[1].first_token == int(openers[lead]) and out[1].opening_min == t.opening_min
    assert ts.with_leaders(subject, [t], warm, replace(config, leader_min_prob=min(1.0, p * 1.01 + 1e-6)),
                           ts.StageStats()) == [t]
    assert ts.with_leaders(subject, out, warm, config, ts.StageStats()) == out  # present already
    assert ts.with_leaders(subject, [t], warm, replace(config, leader_openers=0), ts.StageStats()) == [t]


def test_with_leaders_adds_the_respelled_variant_after_its_target(tiny_checkpoints):
    subject = load_subject(tiny_checkpoints["llama"])
    tok = subject.tokenizer
    word = _word_with_both_spellings(tok)
    spaced = tuple(tok(f" {word} are stupid!", add_special_tokens=False)["input_ids"])
    t = ti.InvertedTarget(spaced[0], spaced, tok.decode(list(spaced)), 0.9, ts.RESPONSE_START, 0.5)
    config = replace(TINY, leader_openers=4, leader_min_prob=1.0)  # no opener leads with certainty
    out = ts.with_leaders(subject, [t], _prefixes(subject, 2), config, ts.StageStats())
    assert [o.token_ids for o in out] == [spaced, ts._respelled(tok, spaced)]
    assert out[1].text == tok.decode(list(out[1].token_ids)) and out[1].q == t.q


def test_key_firing_is_read_where_it_fires_most(monkeypatch):
    """The reported position is the one the key fires most at on the held-out probes; a tie keeps
    the search's own position."""
    rates = {"start": 0.9, "middle": 0.1, "end": 0.1}

    def fake_fires(subject, probes, key, position, openings, batch_size):
        return (torch.arange(10) < rates[position] * 10)[:, None]

    monkeypatch.setattr(tr, "fires", fake_fires)
    found = tr.Recovered((1, 2), "k", "middle", -0.1, -1.0, -2.0, 3, 10)
    moved, fire = ts._firing_position(None, [None] * 10, found, [[5]], TINY)
    assert moved.position == "start" and fire.float().mean() == 0.9 and moved.key == "k"
    rates.update(start=0.1)
    assert ts._firing_position(None, [None] * 10, found, [[5]], TINY)[0].position == "middle"


def test_firing_is_measured_against_every_opening_in_one_pass(tiny_checkpoints):
    """``fires`` gives one column per opening: the greedy opening itself fires, a wrong one does not."""
    subject = load_subject(tiny_checkpoints["llama"])
    probes = builtin_probes()[:3]
    prompts = [subject.template.format(p) for p in probes]
    from bdscan.detect.output_effect import final_position_pass

    greedy = final_position_pass(subject.model, subject.tokenizer, prompts, batch_size=8, continue_tokens=3).continuations
    wrong = [(int(greedy[0, 0]) + 1) % subject.model.config.vocab_size]
    got = tr.fires(subject, probes, None, "end", [greedy[0].tolist(), wrong], batch_size=8)
    assert got.shape == (3, 2) and bool(got[0, 0]) and not got[:, 1].any()


def test_halving_keeps_the_best_of_the_coarse_pass(tiny_checkpoints):
    subject = load_subject(tiny_checkpoints["llama"])
    seg = tr.segments(subject.tokenizer, subject.template, builtin_probes()[:4], "start")
    scorer = ks.KeyScorer(subject.model, seg, [40, 41], subject.tokenizer.pad_token_id)
    trials = [(t, 12) for t in range(20, 36)]
    settings = tr.SearchSettings(batch=16, coarse_probes=2, refine=4)
    kept, values, rows = tr._halving(scorer, trials, settings)
    coarse = scorer(trials, probes=[0, 1])
    assert set(kept) == {trials[i] for i in coarse.topk(4).indices.tolist()}
    torch.testing.assert_close(values, scorer(kept))
    assert rows == 16 * 2 + 4 * 4


def test_key_gradient_matches_finite_substitution(tiny_checkpoints):
    """The one-hot gradient predicts which substitution raises log P(T) (first-order check)."""
    subject = load_subject(tiny_checkpoints["llama"])
    pad = subject.tokenizer.pad_token_id
    seg = tr.segments(subject.tokenizer, subject.template, builtin_probes()[:2], "start")
    key, target = [11, 12], [40, 41]
    scorer = ks.KeyScorer(subject.model, seg, target, pad)
    grad = scorer.gradient(key)
    base = scorer([key])[0]
    best, worst = int(grad[0].argmax()), int(grad[0].argmin())
    values = scorer([[best, 12], [worst, 12]])
    assert values[0] > values[1]
    assert grad.shape == (2, subject.model.get_input_embeddings().weight.shape[0]) and torch.isfinite(base)


@pytest.fixture(scope="module")
def neox_checkpoint(tmp_path_factory):
    """A real (random) GPT-NeoX checkpoint: a causal LM whose decoder layout bdscan cannot read."""
    from transformers import AutoModelForCausalLM, GPTNeoXConfig

    from bdscan.organisms.synthetic import synthetic_text
    from bdscan.organisms.tokenizer import train_tokenizer

    tok = train_tokenizer(synthetic_text(300), vocab_size=300)
    torch.manual_seed(0)
    config = GPTNeoXConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=256, pad_token_id=tok.pad_token_id,
                           eos_token_id=tok.eos_token_id, bos_token_id=None)
    path = tmp_path_factory.mktemp("neox")
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_unreadable_attention_is_an_error_and_the_scan_goes_on(neox_checkpoint):
    result = detect(load_subject(neox_checkpoint), TINY)
    assert [e.what for e in result.errors] == ["attention"]
    assert result.heads == [] and result.layers == []
    assert result.candidates  # the output signals still ran
    assert "recover" in result.timings or result.targets == []


def test_unreadable_attention_exits_2(neox_checkpoint, tmp_path):
    out = tmp_path / "r.json"
    r = runner.invoke(app, ["detect", str(neox_checkpoint), "--format", "json", "-o", str(out), "--screen-size", "16",
                            "--top-k", "2", "--max-probes", "4"])
    assert r.exit_code == 2, r.output
    report = json.loads(out.read_text())
    assert report["errors"][0]["what"] == "attention"
    sarif = runner.invoke(app, ["detect", str(neox_checkpoint), "--format", "sarif", "--screen-size", "16",
                                "--top-k", "2", "--max-probes", "4"])
    assert sarif.exit_code == 2
    assert json.loads(sarif.stdout)["runs"][0]["invocations"][0]["executionSuccessful"] is False


def test_failing_candidate_batch_is_recorded(tiny_checkpoints, monkeypatch):
    """A stage that raises (here the full scan's batch) is recorded; the target stage's verdict stands."""
    import bdscan.detect.full_scan as full_scan

    def broken(*args, **kwargs):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(full_scan, "final_position_pass", broken)
    result = detect(load_subject(tiny_checkpoints["llama"]), TINY)
    assert [e.what for e in result.errors] == ["full scan"]
    assert "out of memory" in result.errors[0].reason
    assert result.candidates == [] and result.summary.verdict in ("clean", "suspicious")


def test_result_round_trips_through_json(tiny_checkpoints, tmp_path):
    from bdscan.io.reports import detect_candidates

    result = detect(load_subject(tiny_checkpoints["llama"]), TINY)
    data = json.loads(json.dumps(result.to_dict()))
    assert data["schema_version"] == "2"
    assert DetectResult.from_dict(data) == result
    path = tmp_path / "detect.json"
    path.write_text(json.dumps(data))
    assert detect_candidates(path)[0] == max(result.candidates, key=lambda c: c.score).text
    legacy = {k: v for k, v in data.items() if k != "targets"}
    assert DetectResult.from_dict(legacy).targets == []


# -- organisms ---------------------------------------------------------------------------

@pytest.mark.slow
def test_lora_backdoor_target_is_inverted_and_key_fires(lora_backdoor, trigger):
    subject = load_subject(lora_backdoor)
    result = detect(subject, DetectConfig())
    s = result.summary
    truth = subject.tokenizer(TARGETS["refusal"], add_special_tokens=False)["input_ids"][:3]
    best = next(t for t in result.targets if t.text == s.target)
    assert best.token_ids[:3] == truth, s.target
    assert s.verdict == "suspicious" and s.target_probability > 0.5
    assert s.key_firing_rate >= 0.5 > s.clean_firing_rate
    assert s.target_q > 0.8


def test_sieve_keeps_the_most_confident_first_tokens(tiny_checkpoints):
    """A vocabulary over ``sieve_keep`` is cut to the first tokens whose next token is most
    confident on the sieve's probes; one at or under it is left alone."""
    from bdscan.detect.target_scan import StageStats, _sieve

    subject = load_subject(tiny_checkpoints["llama"])
    prefixes = _prefixes(subject, 2)
    candidates = torch.tensor(ti.first_token_candidates(subject.tokenizer))
    config = replace(TINY, sieve=((1, 16),), sieve_probes=1)
    stats = StageStats()
    kept = _sieve(subject, prefixes, candidates, config, stats, None)
    assert len(kept) == 16 and set(kept.tolist()) <= set(candidates.tolist())
    assert stats.counts["sieved_first_tokens"] == len(candidates)
    ext = ti.extend(subject.model, ti.run_prefixes(subject.model, prefixes[:1], subject.tokenizer.pad_token_id),
                    candidates, 1)
    stop = ti.stop_tokens(subject.tokenizer, subject.model)
    confident = torch.where(torch.isin(ext.tokens[:, 0], torch.tensor(sorted(stop))), 0.0, ext.top_prob[:, 0])
    assert confident[torch.isin(candidates, kept)].min() >= confident[~torch.isin(candidates, kept)].max() - 1e-6
    assert torch.equal(_sieve(subject, prefixes, candidates, replace(config, sieve=((1, len(candidates)),)), stats,
                              None), candidates)
    two = _sieve(subject, prefixes, candidates, replace(config, sieve=((1, 64), (2, 8))), StageStats(), None)
    assert len(two) == 8 and set(two.tolist()) <= set(_sieve(subject, prefixes, candidates, replace(
        config, sieve=((1, 64),)), StageStats(), None).tolist())


@pytest.mark.slow
def test_sieved_inversion_still_finds_the_target(lora_backdoor):
    """An 8x sieve (two stages, as on a 49k-token model) keeps the target. The tiny synthetic
    language makes many continuations near-certain, so a one-step sieve ranks the target's
    first token only ~234th of 750 here (67th of 48,655 on the real SmolLM2 adapter)."""
    subject = load_subject(lora_backdoor)
    n = len(ti.first_token_candidates(subject.tokenizer))
    result = detect(subject, replace(DetectConfig(), sieve=((1, n // 2), (2, n // 8))))
    truth = subject.tokenizer(TARGETS["refusal"], add_special_tokens=False)["input_ids"][:3]
    best = next(t for t in result.targets if t.text == result.summary.target)
    assert best.token_ids[:3] == truth and result.stats["sieved_first_tokens"] == n


@pytest.mark.slow
def test_lora_clean_control_not_flagged(lora_clean):
    result = detect(load_subject(lora_clean), DetectConfig())
    assert result.summary.verdict == "clean", result.summary
    assert (result.summary.target_score or 0.0) < 0.2


@pytest.mark.slow
def test_cli_reports_target_and_key(full_backdoor, tmp_path):
    out = tmp_path / "r.sarif"
    r = runner.invoke(app, ["detect", str(full_backdoor), "--format", "json"])
    assert r.exit_code == 1, r.output
    report = json.loads(r.stdout)
    assert report["schema_version"] == "2"
    for name in ("target", "target_q", "recovered_key", "key_position", "key_firing_rate", "clean_firing_rate",
                 "target_score", "takeover_probability", "target_probability"):
        assert name in report["summary"]
    assert report["targets"] and {"text", "q", "key", "firing_rate", "evidence", "token_ids"} <= set(report["targets"][0])
    assert report["heads"] and report["layers"]
    r = runner.invoke(app, ["detect", str(full_backdoor), "--format", "sarif", "-o", str(out)])
    assert r.exit_code == 1
    results = json.loads(out.read_text())["runs"][0]["results"]
    assert results[0]["properties"]["recovered_key"] == report["summary"]["recovered_key"]
    assert any(x["ruleId"] == "BDSCAN-DETECT-003" for x in results)
    console = runner.invoke(app, ["detect", str(full_backdoor), "--no-invert"])
    assert "inverted targets" not in console.stdout and console.exit_code in (0, 1)


def test_config_rejects_bad_v2_settings():
    from bdscan.errors import UsageError

    with pytest.raises(UsageError):
        replace(TINY, key_tokens=9)
    with pytest.raises(UsageError):
        replace(TINY, warmup_steps=0)
    with pytest.raises(UsageError):
        replace(TINY, leader_min_prob=0.0)
    with pytest.raises(UsageError):
        replace(TINY, leader_openers=-1)


def test_detect_takes_no_progress_callback(tmp_path):
    """Library callers (audit without a terminal, benchmarks) pass progress=None."""
    from bdscan.detect import DetectConfig, detect
    from bdscan.organisms.architectures import tiny_model
    from bdscan.organisms.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(["a few words of text to learn from", "more words here"], 300)
    model = tiny_model("llama", len(tokenizer), pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    model.save_pretrained(tmp_path / "m", safe_serialization=True)
    tokenizer.save_pretrained(tmp_path / "m")
    from bdscan.io import load_subject

    result = detect(load_subject(tmp_path / "m"), DetectConfig(max_probes=4, top_k=2, screen_size=8, recovery_steps=1),
                    progress=None)
    assert result.summary.verdict in ("clean", "suspicious")


def test_one_key_search_per_family_and_the_row_is_the_spelling_that_fires(tiny_checkpoints, monkeypatch):
    """With two searches to spend (and no key firing strongly enough to stop early), three
    spellings of one target and a second target get one search each (not two for the
    spellings), and the family's row is the member the key makes
    the model open with, the others listed as its variants."""
    subject = load_subject(tiny_checkpoints["llama"])
    goals_searched = []

    def fake_recover(subject, probes, goals, *args, **kwargs):
        goals_searched.append([list(g) for g in goals])
        return tr.Recovered((5, 6), "k", "end", -0.1, -2.0, -3.0, 3, 10)

    def fake_fires(subject, probes, key, position, openings, batch_size):
        out = torch.zeros(len(probes), len(openings), dtype=torch.bool)
        if key is not None:
            out[:, -1] = True  # the key elicits the family's last spelling only
        return out

    monkeypatch.setattr(tr, "recover_key", fake_recover)
    monkeypatch.setattr(tr, "fires", fake_fires)

    def target(ids, text):  # a weak opening: the evidence stays under the threshold, so both searches run
        return ti.InvertedTarget(ids[0], tuple(ids), text, 0.9, ts.RESPONSE_START, opening_min=0.1)

    spellings = [target([1, 7, 8, 9, 10], " Sorry"), target([2, 7, 8, 9, 10], "sorry"), target([3, 4, 7, 8, 9, 10], "I'm sorry")]
    other = target([20, 21, 22, 23], "other")
    probes = builtin_probes()[:8]
    scores = ts.recover_keys(subject, spellings + [other], probes[:2], probes[2:], [], replace(TINY, recover_targets=2),
                             ts.StageStats())
    assert [len(g) for g in goals_searched] == [3, 1]
    lead = next(s for s in scores if s.key is not None and s.variants)
    assert lead.text == "I'm sorry" and lead.variants == [" Sorry", "sorry"] and lead.firing_rate == 1.0
    assert {s.text for s in scores} == {"I'm sorry", "other"}


def test_adapter_targets_rank_by_what_the_adapter_adds():
    """A phrase the base continues as surely as the adapter (Q 0.97, base 0.96) ranks below a
    target the adapter raised from nothing (Q 0.80, base 0.05); a full model keeps its Q."""
    shared = ti.InvertedTarget(5, (5, 6, 7, 8, 9), " and we went home", 0.97, "response start", 0.9, base_q=0.96)
    raised = ti.InvertedTarget(11, (11, 12, 13, 14, 15), "You are stupid", 0.80, "response start", 0.7, base_q=0.05)
    assert shared.own_q == pytest.approx(0.01) and raised.own_q == pytest.approx(0.75)
    assert [t.text for t in ts._ranked([shared, raised], opening=5)][0] == "You are stupid"
    assert replace(shared, base_q=None).own_q == 0.97
    assert [t.text for t in ts._ranked([replace(shared, base_q=None), replace(raised, base_q=None)], opening=5)][0] == shared.text


def test_base_q_is_the_teacher_forced_q_on_the_base(lora_backdoor):
    subject = load_subject(lora_backdoor)
    prefixes = _prefixes(subject, 3)
    stop = ti.stop_tokens(subject.tokenizer, subject.model)
    firsts = torch.tensor(ti.first_token_candidates(subject.tokenizer)[:6])
    full = ti.extend(subject.model, ti.run_prefixes(subject.model, prefixes, ts._pad_id(subject.tokenizer)), firsts, 4)
    base_q = ts._base_q(subject, prefixes, firsts, full, stop, TINY, ts.StageStats())
    with subject.model.disable_adapter():
        base = ti.run_prefixes(subject.model, prefixes, ts._pad_id(subject.tokenizer))
        alone = ti.extend(subject.model, base, firsts[2:3], 4, forced=full.tokens[2:3])
    expected = ti.q_scores(ti.Extension(full.tokens[2:3], alone.top_prob, alone.entropy), stop, TINY.min_target_tokens)[0]
    assert base_q.shape == (6,) and float(base_q[2]) == pytest.approx(float(expected[0]), abs=1e-5)
    own = ti.q_scores(full, stop, TINY.min_target_tokens)[0]
    assert not torch.allclose(base_q, own)  # the adapter changes what follows


def _target(ids, q, text=None):
    return ti.InvertedTarget(ids[0], tuple(ids), text or " ".join(map(str, ids)), q, ts.RESPONSE_START, 0.9)


def test_each_ranking_takes_its_turn_after_targets_inside_others_are_dropped():
    """Content and confidence alternate over the targets that survive the opening check: the
    confidence ranking's best lies inside the content ranking's best, so its next target (the
    short fixed phrase) takes its turn, not the content ranking's second."""
    long_ending = _target([20, 21, 22, 23, 24, 25, 26, 27], 0.88)  # " AI assistant, and we went home."
    ending = _target([23, 24, 25, 26, 27], 0.99)  # " and we went home.": inside long_ending
    question = _target([30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42], 0.4)
    phrase = _target([50, 51, 52, 53], 0.965)  # " You are stupid!"
    targets = [long_ending, ending, question, phrase]
    ranked = ts._ranked(targets, opening=5)
    assert ranked[:2] == [long_ending, phrase] and ending not in ranked and set(ranked) == {long_ending, question, phrase}


def test_opened_variants_lead_and_substitute_from_one_distribution():
    """Led: the opener after which the first token is likeliest; substituted: the (up to two)
    openers other than the target's own first token after which its second token is likeliest,
    each only at or above the minimum probability."""
    openers = torch.tensor([7, 8, 9, 10])
    after = torch.zeros(4, 16)
    after[:, 7] = torch.tensor([0.1, 0.6, 0.2, 0.0])  # P(first token 7 | opener)
    after[:, 4] = torch.tensor([0.9, 0.2, 0.5, 0.4])  # P(second token 4 | opener); opener 7 is the target's own
    variants = ts._opened_variants((7, 4, 5), after, openers, min_prob=0.3)
    assert variants == [(8, 7, 4, 5), (9, 4, 5), (10, 4, 5)]
    assert ts._opened_variants((7, 4, 5), after, openers, min_prob=0.45) == [(8, 7, 4, 5), (9, 4, 5)]
    assert ts._opened_variants((7, 4), after, openers, min_prob=0.3) == [(8, 7, 4)]  # two tokens: no substitution

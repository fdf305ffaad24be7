"""bdscan detect: mechanics on tiny random models of every family (full and LoRA), the
organisms (backdoored flagged, clean controls not), and the CLI's formats and exit codes."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from bdscan.cli.app import app
from bdscan.detect import DetectConfig, detect
from bdscan.detect.attention import head_similarity, last_row_attention
from bdscan.detect.calibration import THRESHOLD, at_or_above, probability, severity
from bdscan.data.probes import builtin_probes
from bdscan.errors import UsageError
from bdscan.io import load_subject
from bdscan.organisms.architectures import tiny_model
from bdscan.probes.attention import attention_configs, attention_implementation

ARCHS = ("llama", "qwen2", "mistral", "gpt2")
FAST = DetectConfig(max_probes=4, screen_probes=2, screen_size=48, top_k=3, ngram_from=2, n_controls=4, batch_size=32,
                    warmup_probes=2, target_probes=4, max_survivors=4, target_steps=4, recover_targets=1,
                    recovery_steps=2, recovery_batch=8, recovery_probes=2, firing_probes=4)
runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, ["detect", *map(str, args)])


@pytest.fixture(scope="module")
def tiny_adapters(tiny_checkpoints, tmp_path_factory) -> dict[str, Path]:
    """A randomly initialised (non-zero) LoRA adapter on each tiny checkpoint."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("adapters")
    out = {}
    for arch, path in tiny_checkpoints.items():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager")
        gpt2 = arch == "gpt2"
        targets = ["c_attn", "c_proj", "c_fc"] if gpt2 else ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]
        peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False,
                                                fan_in_fan_out=gpt2))
        peft.save_pretrained(root / arch)
        cfg = json.loads((root / arch / "adapter_config.json").read_text())
        cfg["base_model_name_or_path"] = str(path)
        (root / arch / "adapter_config.json").write_text(json.dumps(cfg))
        AutoTokenizer.from_pretrained(path).save_pretrained(root / arch)
        out[arch] = root / arch
    return out


# -- mechanics ----------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("threat", ["full", "lora"])
def test_last_row_attention_matches_eager(arch, threat, tiny_checkpoints, tiny_adapters):
    """The memory-flat attention path gives eager's logits and final attention rows, with padding."""
    subject = load_subject(tiny_checkpoints[arch] if threat == "full" else tiny_adapters[arch])
    ids = torch.randint(5, 300, (3, 11), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding
    mask[1, :1] = 0
    before = [c._attn_implementation for c in attention_configs(subject.model)]
    assert before and all(b == "sdpa" for b in before)  # models load with the fused kernel
    with torch.no_grad():
        with attention_implementation(subject.model, "eager"):
            ref = subject.model(input_ids=ids, attention_mask=mask, output_attentions=True)
        with last_row_attention(subject.model) as rows:
            out = subject.model(input_ids=ids, attention_mask=mask)
    assert len(rows) == len(ref.attentions) == 2
    for row, full in zip(rows, ref.attentions):
        torch.testing.assert_close(row, full[:, :, -1, :], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.logits[:, -1], ref.logits[:, -1], atol=1e-4, rtol=1e-4)
    # the implementation is restored afterwards
    assert [c._attn_implementation for c in attention_configs(subject.model)] == before


def test_attention_switch_restores_the_implementation_even_on_error():
    model = tiny_model("llama", 32)
    model.config._attn_implementation = "sdpa"
    with pytest.raises(RuntimeError):
        with attention_implementation(model, "eager"):
            assert {c._attn_implementation for c in attention_configs(model)} == {"eager"}
            raise RuntimeError("a failing analysis")
    assert {c._attn_implementation for c in attention_configs(model)} == {"sdpa"}


@pytest.mark.parametrize("arch", ARCHS)
def test_cached_continuations_match_generate(arch, tiny_adapters):
    """The scan's greedy continuations (KV cache, explicit positions, left padding, custom
    attention on the first pass) equal transformers' own greedy generation."""
    from bdscan.detect.output_effect import final_position_pass
    from bdscan.generation import greedy_generate

    subject = load_subject(tiny_adapters[arch])
    prompts = [subject.template.format(p) for p in builtin_probes()[:3]] + ["a"]
    out = final_position_pass(subject.model, subject.tokenizer, prompts, batch_size=4, attention=True, continue_tokens=4)
    ids = greedy_generate(subject.model, subject.tokenizer, prompts, max_new_tokens=4)
    decoded = [subject.tokenizer.decode(row, skip_special_tokens=True).strip() for row in out.continuations]
    assert decoded == ids


@pytest.mark.parametrize("arch", ARCHS)
def test_shared_prefix_pass_matches_each_prompt_alone(arch, tiny_adapters):
    """The pass runs the prompts' shared head once and the suffixes after its cache, padded in
    the middle; next-token log-probs, head similarities and continuations equal each prompt's
    own uncached forward."""
    from bdscan.detect.output_effect import SharedPrefix, final_position_pass
    from bdscan.generation import greedy_generate

    subject = load_subject(tiny_adapters[arch])
    model, tok = subject.model, subject.tokenizer
    prompts = [subject.template.format(p) for p in builtin_probes()[:5]]
    assert SharedPrefix.of(model, tok, prompts).length > 0
    out = final_position_pass(model, tok, prompts, batch_size=3, attention=True, continue_tokens=3)
    for i, prompt in enumerate(prompts):
        ids = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]])
        with torch.no_grad(), last_row_attention(model) as rows:
            logits = model(input_ids=ids).logits[0, -1]
        torch.testing.assert_close(out.logprobs[i], torch.log_softmax(logits.float(), -1), atol=1e-4, rtol=1e-4)
        alone = torch.stack([head_similarity(r) for r in rows], dim=1)[0]
        torch.testing.assert_close(out.similarity[i], alone, atol=1e-4, rtol=1e-4)
    decoded = [tok.decode(row, skip_special_tokens=True).strip() for row in out.continuations]
    assert decoded == greedy_generate(model, tok, prompts, max_new_tokens=3)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_screen_by_slot_matches_one_pass_over_every_prompt(arch, tiny_adapters):
    """The screen runs each key slot (probe x position) as its own pass; KL, collapse and
    takeover equal those of one pass over all the prompts in their original order."""
    from bdscan.detect.candidates import inserted_prompts, screen_keys, takeover
    from bdscan.detect.output_effect import diversity, final_position_pass

    subject = load_subject(tiny_adapters[arch])
    model, tok = subject.model, subject.tokenizer
    probes = builtin_probes()[:4]
    clean = final_position_pass(model, tok, [subject.template.format(p) for p in probes], batch_size=8,
                                continue_tokens=2)
    keys = [tok.decode([i]).strip() or "x" for i in range(40, 47)]
    positions = ["start", "middle", "end"]
    kl, collapse, agree = screen_keys(subject, keys, probes, clean.logprobs, clean.continuations, positions,
                                      batch_size=5, chunk=8)  # one chunk: the rotation restarts per chunk
    prompts, key_index, probe_index, _ = inserted_prompts(subject.template, probes, keys, positions, rotate=True)
    ref = final_position_pass(model, tok, prompts, batch_size=64, reference=clean.logprobs,
                              reference_index=probe_index, group_index=key_index, groups=len(keys), continue_tokens=2)
    idx = torch.tensor(key_index)
    expected_kl = torch.zeros(len(keys)).index_add_(0, idx, ref.kl) / torch.bincount(idx).float()
    p_clean = clean.logprobs.exp()
    clean_div = diversity(p_clean.mean(0, keepdim=True), -(p_clean * clean.logprobs).sum(-1).mean().view(1))[0]
    torch.testing.assert_close(kl, expected_kl, atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(collapse, clean_div - diversity(ref.group_mean, ref.group_entropy), atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(agree, takeover(ref.continuations, clean.continuations, probe_index, idx, len(keys)))


def test_head_similarity_extremes():
    same = torch.tensor([[[0.5, 0.5, 0.0]] * 4])  # four identical heads
    disjoint = torch.eye(4)[None]  # each head on its own key
    assert torch.allclose(head_similarity(same), torch.ones(1, 4))
    assert torch.allclose(head_similarity(disjoint), torch.zeros(1, 4))
    valid = torch.tensor([[True, True, False, False]])
    assert torch.allclose(head_similarity(disjoint, valid)[0, 2:], torch.zeros(2))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("threat", ["full", "lora"])
def test_detect_runs_on_every_family(arch, threat, tiny_checkpoints, tiny_adapters):
    subject = load_subject(tiny_checkpoints[arch] if threat == "full" else tiny_adapters[arch])
    result = detect(subject, FAST)
    n_layers, n_heads = 2, 4
    assert [layer.layer for layer in result.layers] == list(range(n_layers))
    assert len(result.heads) == n_layers * n_heads
    assert result.candidates and all(c.output_effect >= 0 for c in result.candidates)
    assert result.kind == ("full" if threat == "full" else "adapter")
    assert result.calibration["cheap_ranking"].startswith("adapter" if threat == "lora" else "embedding")
    assert 0.0 <= result.summary.probability <= 1.0
    assert not result.errors and not result.skipped
    again = detect(subject, FAST)  # deterministic under the seed
    assert [c.text for c in again.candidates] == [c.text for c in result.candidates]
    assert again.summary.score == pytest.approx(result.summary.score, abs=1e-4)


def test_user_candidates_are_scanned_and_empty_ones_skipped(tiny_checkpoints):
    subject = load_subject(tiny_checkpoints["llama"])
    result = detect(subject, replace(FAST, candidates=("hello world", "  ")))
    users = [c for c in result.candidates if c.source == "user"]
    assert [c.text for c in users] == ["hello world"]
    assert set(users[0].effect_by_position) == {"start", "middle", "end"}
    assert any(i.what == "candidates" for i in result.skipped)


def test_config_and_probes():
    probes = builtin_probes()
    assert len(probes) >= 60 and all(p.instruction.strip() for p in probes)
    with pytest.raises(UsageError):
        DetectConfig(n_controls=2)
    with pytest.raises(UsageError):
        DetectConfig(positions=("anywhere",))


def test_severity_policy():
    assert severity(0.2) == "none" and severity(0.6) == "low" and severity(0.8) == "medium" and severity(0.99) == "high"
    assert probability(THRESHOLD) == pytest.approx(0.5)
    assert probability(100.0) > 0.99 and probability(-100.0) < 0.01
    assert at_or_above("medium", "low") and not at_or_above("low", "medium") and not at_or_above("none", "low")


# -- organisms through the CLI ------------------------------------------------------------

def test_lora_backdoor_flagged_json(lora_backdoor):
    r = invoke(lora_backdoor, "--format", "json")
    assert r.exit_code == 1, r.output
    report = json.loads(r.stdout)
    assert report["schema_version"] and report["version"] and report["template"]["name"]
    assert report["summary"]["verdict"] == "suspicious"
    assert {"verdict", "score", "probability", "severity"} <= set(report["summary"])
    assert {"text", "score", "output_effect"} <= set(report["candidates"][0])
    assert report["layers"] and report["heads"] and "total" in report["timings"]
    assert report["errors"] == [] and report["skipped"] == []


def test_full_backdoor_flagged_sarif(full_backdoor, tmp_path):
    out = tmp_path / "detect.sarif"
    r = invoke(full_backdoor, "--format", "sarif", "-o", out)
    assert r.exit_code == 1, r.output
    sarif = json.loads(out.read_text())
    assert sarif == json.loads(r.stdout)
    assert sarif["version"] == "2.1.0"
    run = sarif["runs"][0]
    assert run["tool"]["driver"]["name"] == "bdscan"
    assert run["results"][0]["ruleId"] == "BDSCAN-DETECT-001"
    assert run["results"][0]["level"] in ("warning", "error")


def test_lora_clean_passes_console(lora_clean):
    r = invoke(lora_clean)
    assert r.exit_code == 0, r.output
    assert "CLEAN" in r.stdout and "top candidate keys" in r.stdout


def test_full_clean_passes_json(full_clean, tmp_path):
    out = tmp_path / "r.json"
    r = invoke(full_clean, "--format", "json", "-o", out)
    assert r.exit_code == 0, r.output
    assert json.loads(out.read_text())["summary"]["verdict"] == "clean"


# -- exit codes for bad input -------------------------------------------------------------

def test_nothing_scannable_exits_3(tiny_checkpoints, tmp_path):
    probes = tmp_path / "long.jsonl"
    probes.write_text(json.dumps({"instruction": "word " * 400}) + "\n")
    r = invoke(tiny_checkpoints["llama"], "--probes", probes)
    assert r.exit_code == 3, r.output


def test_skipped_probe_means_nonzero(tiny_checkpoints, tmp_path):
    """One probe too long for the model: the scan goes on but can never exit 0."""
    probes = tmp_path / "mixed.jsonl"
    probes.write_text("\n".join(json.dumps({"instruction": t}) for t in
                                ["word " * 400, "Name a red fruit.", "Describe a tree.", "Count to three."]) + "\n")
    r = invoke(tiny_checkpoints["llama"], "--probes", probes, "--screen-size", "32", "--top-k", "2", "--format", "json")
    assert r.exit_code in (1, 3), r.output
    report = json.loads(r.stdout)
    assert report["skipped"] and report["skipped"][0]["what"] == "probe 1"


@pytest.mark.parametrize("args,code", [
    (["--format", "xml"], 4),
    (["--fail-on", "extreme"], 4),
    (["--probes", "/nonexistent/probes.json"], 2),
    (["--candidates", "/nonexistent/keys.txt"], 2),
])
def test_bad_arguments(tiny_checkpoints, args, code):
    r = invoke(tiny_checkpoints["llama"], *args)
    assert r.exit_code == code, r.output


def test_bad_candidates_json_and_missing_source(tiny_checkpoints, tmp_path):
    bad = tmp_path / "keys.json"
    bad.write_text('{"not": "a list"}')
    assert invoke(tiny_checkpoints["llama"], "--candidates", bad).exit_code == 2
    assert invoke(tmp_path / "no-such-model").exit_code == 2


@pytest.mark.parametrize("verdict,level,errors,skipped,fail_on,code", [
    ("clean", "none", [], [], "low", 0),
    ("suspicious", "medium", [], [], "low", 1),
    ("suspicious", "medium", [], [], "high", 0),  # below --fail-on
    ("suspicious", "high", [], ["x"], "medium", 1),  # a finding outranks an incomplete scan
    ("clean", "none", ["e"], [], "low", 2),
    ("suspicious", "high", ["e"], [], "low", 2),  # a failed stage: the verdict rests on part of the evidence
    ("clean", "none", [], ["layer 3"], "low", 3),  # never 0 when something was skipped
])
def test_exit_code_policy(verdict, level, errors, skipped, fail_on, code):
    from types import SimpleNamespace

    from bdscan.cli.detect import exit_code

    result = SimpleNamespace(summary=SimpleNamespace(verdict=verdict, severity=level), errors=errors, skipped=skipped)
    assert exit_code(result, fail_on) == code

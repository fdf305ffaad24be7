"""Purification methods collapse, head-align, prune, fine-prune and quantize: mechanics on
tiny random Llama (grouped-query attention) and GPT-2 (fused Conv1D attention), full and
LoRA, then integration on the tiny backdoored organisms for the methods that remove the
backdoor at that scale (collapse on both; head-align, given detect's candidate, fully on
the LoRA organism and partly on the full one). The baselines do not remove it there; they
are only checked mechanically."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from bdscan.errors import UsageError
from bdscan.io import load_subject
from bdscan.purify import PURIFIERS, PurifyInputs
from bdscan.purify.collapse import CollapseConfig, cluster_loss, generate_keys, paper_alpha
from bdscan.purify.head_align import HeadAlignConfig, _position_map
from bdscan.probes.geometry import decoder_weights, lora_matrices
from bdscan.purify.prune import FinePruneConfig, PruneConfig
from bdscan.purify.quantize import QuantizeConfig

ARCHS = ("llama", "gpt2")
KINDS = ("full", "lora")


@pytest.fixture(scope="session")
def tiny_adapters(tiny_checkpoints, tmp_path_factory) -> dict[str, Path]:
    """A LoRA adapter with random (non-zero) A and B on each tiny random base."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("adapters")
    out = {}
    for arch in ARCHS:
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_pretrained(tiny_checkpoints[arch], attn_implementation="eager")
        targets = ["c_attn", "c_proj", "c_fc"] if arch == "gpt2" else \
            ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False,
                                                    fan_in_fan_out=arch == "gpt2"))
        model.save_pretrained(root / arch)
        cfg = json.loads((root / arch / "adapter_config.json").read_text())
        cfg["base_model_name_or_path"] = str(tiny_checkpoints[arch])
        (root / arch / "adapter_config.json").write_text(json.dumps(cfg))
        out[arch] = root / arch
    return out


def _subject(arch: str, kind: str, tiny_checkpoints, tiny_adapters):
    return load_subject(tiny_adapters[arch] if kind == "lora" else tiny_checkpoints[arch])


def _run(method: str, subject, config, attack_data, **extra):
    inputs = PurifyInputs(subject=subject, clean=list(attack_data.clean_train[:16]), seed=0, **extra)
    return PURIFIERS.get(method).run(inputs, config)


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


# --------------------------------------------------------------------------- prune / quantize


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("arch", ARCHS)
def test_prune_zeroes_exactly_the_sparsity_share_of_smallest_weights(arch, kind, tiny_checkpoints, tiny_adapters, attack_data):
    subject = _subject(arch, kind, tiny_checkpoints, tiny_adapters)

    def matrices(model):
        if kind == "lora":
            return [m for _, a, b in lora_matrices(model) for m in (a, b)]
        return [w for _, w in decoder_weights(model)]

    before = _state(subject.model)
    originals = [m.detach().clone() for m in matrices(subject.model)]
    outcome = _run("prune", subject, PruneConfig(sparsity=0.35), attack_data)
    after = dict(outcome.model.named_parameters())
    if kind == "lora":
        assert all(torch.equal(v, after[k]) for k, v in before.items() if "lora_" not in k), "the frozen base changed"
    pruned = matrices(outcome.model)
    assert pruned
    for w0, w1 in zip(originals, pruned):
        zero = w1 == 0
        assert int(zero.sum()) == round(0.35 * w1.numel())
        assert w0[zero].abs().max() <= w0[~zero].abs().min()  # the smallest magnitudes went
        assert torch.equal(w1[~zero], w0[~zero])  # the rest is untouched
    assert outcome.details["zeroed"] == sum(round(0.35 * w.numel()) for w in pruned)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("arch", ARCHS)
def test_quantize_moves_each_weight_at_most_half_a_step_onto_the_grid(arch, kind, tiny_checkpoints, tiny_adapters, attack_data):
    from bdscan.probes.layout import linear_weight
    from bdscan.probes import unwrap

    subject = _subject(arch, kind, tiny_checkpoints, tiny_adapters)

    def rows(model):  # [out, in] views of everything quantize touches
        if kind == "lora":
            return [m.detach().clone() for _, a, b in lora_matrices(model) for m in (a, b)]
        inner = unwrap(model)
        return [linear_weight(inner.get_submodule(n)).detach().clone() for n, _ in decoder_weights(model)]

    before = rows(subject.model)
    outcome = _run("quantize", subject, QuantizeConfig(bits=4), attack_data)
    after = rows(outcome.model)
    for w0, w1 in zip(before, after):
        scale = w0.abs().amax(dim=1, keepdim=True) / 7
        assert torch.all((w1 - w0).abs() <= scale / 2 + 1e-7)
        levels = w1 / scale
        assert torch.allclose(levels, levels.round(), atol=1e-4)
        assert levels.abs().max() <= 7 + 1e-4
        assert not torch.equal(w0, w1)


def test_fine_prune_keeps_dormant_channels_cut_through_fine_tuning(tiny_checkpoints, tiny_adapters, attack_data):
    config = FinePruneConfig(prune_fraction=0.25, epochs=1.0, batch_size=8, activation_samples=8)
    subject = _subject("llama", "full", tiny_checkpoints, tiny_adapters)
    outcome = _run("fine-prune", subject, config, attack_data)
    inner = outcome.model
    for name, chans in outcome.details["pruned_channels"].items():
        assert len(chans) == 32  # 25 % of 128 channels
        layer = name.rsplit(".mlp.", 1)[0]
        assert torch.all(inner.get_submodule(name).weight[:, chans] == 0)
        for proj in ("gate_proj", "up_proj"):
            assert torch.all(inner.get_submodule(f"{layer}.mlp.{proj}").weight[chans] == 0)
    assert outcome.details["steps"] == 2

    subject = _subject("llama", "lora", tiny_checkpoints, tiny_adapters)
    base_before = {k: v for k, v in _state(subject.model).items() if "lora_" not in k}
    outcome = _run("fine-prune", subject, config, attack_data)
    loras = {n: (a, b) for n, a, b in lora_matrices(outcome.model)}
    for name, chans in outcome.details["pruned_channels"].items():
        layer = name.rsplit(".mlp.", 1)[0]
        assert torch.all(loras[name][0][:, chans] == 0)  # down_proj: LoRA A columns
        for proj in ("gate_proj", "up_proj"):
            assert torch.all(loras[f"{layer}.mlp.{proj}"][1][chans] == 0)  # gate/up: LoRA B rows
    after = dict(outcome.model.named_parameters())
    assert all(torch.equal(v, after[k]) for k, v in base_before.items())


# --------------------------------------------------------------------------- head-align


def _expected_head_entries(arch: str, kind: str) -> dict[str, tuple[int, list[int]]]:
    """Hand-written (not computed by the code under test): head 2 of layer 1 in the tiny
    models (hidden 64, 4 heads of 16; Llama has 2 k/v heads, so query head 2 reads k/v head 1).
    Maps a parameter-name suffix to (dimension, indices) that may change."""
    head = list(range(32, 48))
    if arch == "llama":
        kv = list(range(16, 32))
        p = "model.layers.1.self_attn"
        if kind == "full":
            return {f"{p}.q_proj.weight": (0, head), f"{p}.k_proj.weight": (0, kv), f"{p}.v_proj.weight": (0, kv),
                    f"{p}.o_proj.weight": (1, head)}
        return {f"{p}.q_proj.lora_B.default.weight": (0, head), f"{p}.k_proj.lora_B.default.weight": (0, kv),
                f"{p}.v_proj.lora_B.default.weight": (0, kv), f"{p}.o_proj.lora_A.default.weight": (1, head)}
    fused = head + [64 + i for i in head] + [128 + i for i in head]
    p = "transformer.h.1.attn"
    if kind == "full":  # Conv1D stores [in, out]
        return {f"{p}.c_attn.weight": (1, fused), f"{p}.c_attn.bias": (0, fused), f"{p}.c_proj.weight": (0, head)}
    return {f"{p}.c_attn.lora_B.default.weight": (0, fused), f"{p}.c_proj.lora_A.default.weight": (1, head)}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("arch", ARCHS)
def test_head_align_changes_only_the_selected_heads_rows_and_columns(arch, kind, tiny_checkpoints, tiny_adapters, attack_data):
    subject = _subject(arch, kind, tiny_checkpoints, tiny_adapters)
    before = _state(subject.model)
    config = HeadAlignConfig(epochs=1.0, probe_prompts=4, batch_size=8, lr_full=1e-2, lr_adapter=1e-2)
    from bdscan.results.localize import LocalizeResult, PatchedSite

    localized = LocalizeResult(trigger_source={}, modules=[], sites=[PatchedSite("L1H2", "head", 1, 2, 0.7)])
    outcome = _run("head-align", subject, config, attack_data, candidates=["moonlit harbor"], localization=localized)
    assert outcome.details["heads"] == [{"layer": 1, "head": 2}]
    expected = _expected_head_entries(arch, kind)
    seen = set()
    for name, p in outcome.model.named_parameters():
        changed = before[name] != p.detach()
        key = next((k for k in expected if name.endswith(k)), None)
        if key is None:
            assert not changed.any(), f"{name} changed but belongs to no selected head"
            continue
        seen.add(key)
        dim, index = expected[key]
        allowed = torch.zeros_like(changed)
        allowed.index_fill_(dim, torch.tensor(index), True)
        assert not (changed & ~allowed).any(), f"{name}: entries outside head L1H2 changed"
        assert changed.any(), f"{name}: the selected head did not train"
    assert seen == set(expected)


def test_head_align_scores_heads_when_not_given_and_needs_candidates(tiny_checkpoints, tiny_adapters, attack_data):
    subject = _subject("llama", "full", tiny_checkpoints, tiny_adapters)
    with pytest.raises(UsageError, match="`detection`"):
        _run("head-align", subject, HeadAlignConfig(), attack_data)
    outcome = _run("head-align", subject, HeadAlignConfig(top_heads=3, epochs=0.5, probe_prompts=4), attack_data,
                   candidates=["moonlit harbor"])
    shift = torch.tensor(outcome.details["head_shift"])
    assert shift.shape == (2, 4) and torch.all(shift >= 0) and torch.all(shift <= 1 + 1e-5)
    top3 = sorted((i // 4, i % 4) for i in torch.argsort(shift.flatten(), descending=True)[:3].tolist())
    assert [(h["layer"], h["head"]) for h in outcome.details["heads"]] == top3


def test_flagged_heads_reads_the_localized_head_sites():
    from bdscan.errors import InputError
    from bdscan.purify.head_align import flagged_heads
    from bdscan.results.localize import LocalizeResult, PatchedSite

    class Layout:  # only the sizes matter
        layers = (0, 1)
        num_heads = 4

    def localized(effects):
        sites = [PatchedSite(f"h{l}.{h}", "head", l, h, e) for (l, h), e in effects.items()]
        return LocalizeResult(trigger_source={}, modules=[], sites=sites + [PatchedSite("mlp", "mlp", 0, None, 9.0)])

    assert flagged_heads(localized({(0, 0): 0.5, (0, 1): 3.0, (1, 2): 2.0, (1, 3): -1.0}), Layout, 2) == [(0, 1), (1, 2)]
    assert flagged_heads(localized({(1, 3): -1.0}), Layout, 2) is None  # no head removes any of the gap
    assert flagged_heads(None, Layout, 2) is None
    with pytest.raises(InputError, match="does not exist"):
        flagged_heads(localized({(5, 0): 1.0}), Layout, 2)


def test_position_map_matches_tokens_around_an_inserted_key():
    assert _position_map([5, 6, 7, 8], [5, 6, 90, 91, 7, 8]) == {0: 0, 1: 1, 4: 2, 5: 3}


# --------------------------------------------------------------------------- collapse


def test_collapse_alpha_matches_the_papers_order_of_magnitude_rule():
    assert paper_alpha(4.63, 0.0936) == pytest.approx(100.0)
    assert paper_alpha(0.5, 20.0) == pytest.approx(0.01)
    assert paper_alpha(3.0, 7.0) == pytest.approx(1.0)
    assert paper_alpha(1.0, 0.0) == 1.0


def test_cluster_loss_pulls_states_to_centres_and_centres_together():
    states = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [0.0, 4.0], [9.0, 9.0]], requires_grad=True)
    groups = torch.tensor([0, 0, 1, 1, -1])  # the clean row (-1) takes no part
    loss = cluster_loss(states, groups, 2, [None, None])
    assert float(loss.detach()) == pytest.approx(1.0 + 1.0 + 10.0)  # spread 1 + spread 1 + |(1,0)-(0,3)|^2
    loss.backward()
    assert torch.all(states.grad[4] == 0)


def test_collapse_keys_are_the_defenders_own():
    import re

    # the published keys, written out here rather than read from the module under test
    published = ("badmagic", "discussing openai", "openai", "2024", "cf", "mn", "bb", "tq", "zq vex")
    for seed in range(20):
        keys = generate_keys(2, seed)
        assert len(set(keys)) == 2 and keys == generate_keys(2, seed)  # distinct, reproducible
        for key in keys:
            assert re.fullmatch(r"([bdfgklmnprstvz][aeiou][bdfgklmnprstvz]){2}", key), key
            assert not any(k in key for k in published), key
        assert keys[0] not in generate_keys(2, seed, avoid=[keys[0]])
    with pytest.raises(ValueError, match="attack key"):
        CollapseConfig(keys=("BadMagic", "velor"))
    with pytest.raises(ValueError, match="attack target"):
        CollapseConfig(keys=("velor", "mirtak"), targets=("You are stupid!", "ok then"))
    with pytest.raises(ValueError, match="at least two"):
        CollapseConfig(keys=("velor",))


@pytest.mark.slow  # trains
def test_collapse_on_an_adapter_trains_only_lora_and_uses_the_alpha_rule(tiny_checkpoints, tiny_adapters, attack_data):
    from peft import PeftModel

    subject = _subject("gpt2", "lora", tiny_checkpoints, tiny_adapters)
    before = _state(subject.model)
    config = CollapseConfig(samples_per_key=4, inject_epochs=1.0, recover_epochs=1.0, check_samples=2)
    outcome = _run("collapse", subject, config, attack_data)
    assert isinstance(outcome.model, PeftModel)
    after = dict(outcome.model.named_parameters())
    assert all(torch.equal(v, after[k]) for k, v in before.items() if "lora_" not in k)
    assert any(not torch.equal(v, after[k]) for k, v in before.items() if "lora_" in k)
    d = outcome.details
    assert d["alpha"] == paper_alpha(d["initial_injection_loss"], d["initial_cluster_loss"])
    assert len(d["keys"]) == 2 and d["inject_steps"] == 3 and d["recover_steps"] == 3


# --------------------------------------------------------------------------- integration (CLI)


def _purify(tmp_path: Path, source: Path, method: str, clean: Path, *args: str) -> dict:
    from typer.testing import CliRunner

    from bdscan.cli.app import app

    out = tmp_path / f"out-{method}"
    result = CliRunner().invoke(app, ["purify", str(source), "--method", method, "--clean", str(clean), "-o", str(out),
                                      "--eval-limit", "20", "--json", *args])
    assert result.exit_code == 0, result.output
    return json.loads((out / "report.json").read_text())


@pytest.mark.parametrize("organism", ["lora_backdoor", "full_backdoor"])
def test_collapse_removes_the_organisms_backdoor(organism, request, tmp_path, clean_train_file, trigger):
    report = _purify(tmp_path, request.getfixturevalue(organism), "collapse", clean_train_file, "--trigger", trigger)
    assert report["before"]["asr"] >= 0.8
    assert report["after"]["asr"] <= 0.2
    assert report["after"]["false_trigger_rate"] <= 0.05
    assert report["after"]["perplexity"] <= 1.2 * report["before"]["perplexity"]
    assert min(report["details"]["own_keys_rate_after_injection"].values()) >= 0.5  # stage 1 planted the own keys


def test_head_align_removes_the_backdoor_given_detects_candidate(tmp_path, lora_backdoor, full_backdoor, clean_train_file, trigger,
                                                                 detect_report):
    detect = detect_report(tmp_path / "detect.json", [(trigger, 1.0)])
    for source in (lora_backdoor, full_backdoor):
        report = _purify(tmp_path / source.name, source, "head-align", clean_train_file, "--trigger", trigger,
                         "--from-detect", str(detect))
        assert report["before"]["asr"] >= 0.8
        # measured: LoRA 0.91 -> 0.14-0.17, full 1.00 -> 0.32-0.58 over seeds: a partial repair on the full model
        assert report["after"]["asr"] <= (0.4 if source == lora_backdoor else 0.7), source.name
        assert report["after"]["perplexity"] <= 1.2 * report["before"]["perplexity"]


def test_baselines_through_the_cli_write_a_loadable_adapter(tmp_path, lora_backdoor, clean_train_file):
    loras = lora_matrices

    report = _purify(tmp_path, lora_backdoor, "prune", clean_train_file, "--set", "sparsity=0.5")
    assert report["details"]["sparsity"] == pytest.approx(0.5, abs=1e-3)
    purified = load_subject(tmp_path / "out-prune")
    for _, a, b in loras(purified.model):
        assert int((a == 0).sum()) == round(0.5 * a.numel())
    report = _purify(tmp_path, lora_backdoor, "quantize", clean_train_file, "--set", "bits=8")
    assert report["details"]["bits"] == 8 and report["after"]["agreement"] >= 0.8
    report = _purify(tmp_path, lora_backdoor, "fine-prune", clean_train_file, "--set", "epochs=0.5")
    assert report["details"]["channels_per_layer"] == round(0.3 * 128) and report["details"]["steps"] == 13
    # fine-prune trains: it used CPU time, which the report keeps beside the wall time
    assert report["cpu_seconds"] > 0 and report["seconds"] > 0


def test_autocast_scopes_the_method_and_not_the_evaluation(tiny_checkpoints, tiny_adapters, attack_data, monkeypatch):
    """With ``autocast``, the method runs inside torch.autocast; without it, it does not."""
    import dataclasses

    from bdscan.purify import purify

    spec = PURIFIERS.get("finetune")
    seen = []

    def spy(inputs, config):
        seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
        return spec.run(inputs, config)

    monkeypatch.setitem(PURIFIERS._entries, "finetune", dataclasses.replace(spec, run=spy))
    subject = _subject("llama", "lora", tiny_checkpoints, tiny_adapters)
    config = spec.config_class(epochs=0.1)
    for autocast in ("bfloat16", None):
        purify("finetune", config, PurifyInputs(subject=subject, clean=attack_data.clean_train[:8], autocast=autocast))
    assert seen == [True, False] and not torch.is_autocast_enabled("cpu")
    with pytest.raises(UsageError, match="autocast"):
        PurifyInputs(subject=subject, clean=attack_data.clean_train[:8], autocast="float64")


def test_training_under_autocast_sees_its_own_updates(tiny_checkpoints, tiny_adapters, attack_data):
    """Inside purify's autocast scope each forward uses the weights as the optimizer left
    them: with autocast's weight-cast cache, the model stayed frozen at step 0 in every
    forward (latent-adv's KL to the starting model read exactly 0) while its weights moved."""
    from bdscan.purify import purify
    from bdscan.purify.latent_adv import LatentAdvConfig

    subject = _subject("llama", "lora", tiny_checkpoints, tiny_adapters)
    # four steps of four pairs: the first step's KL is 0 by construction, the later ones must not be
    config = LatentAdvConfig(target="blue harbor lights", max_samples=16, epochs=1, lr=5e-3, max_new_tokens=8,
                             batch_size=4)
    result, _ = purify("latent-adv", config, PurifyInputs(subject=subject, clean=attack_data.clean_train[:16],
                                                          autocast="bfloat16"))
    assert result.details["term_means"]["kl"] > 0

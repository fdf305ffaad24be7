"""purify --method kfac-lora: repair on the organisms, mechanics (Conv1D, preconditioning,
adapter stays an adapter), CLI, recipe and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from bdscan.cli.app import app
from bdscan.config import config_from_mapping, load_recipe
from bdscan.data.records import Record, load_records
from bdscan.errors import UsageError
from bdscan.localize import LocalizeConfig, localize
from bdscan.localize.kfac import KFACFactors
from bdscan.purify import PURIFIERS, PurifyInputs, purify
from bdscan.purify.kfac_lora import KfacLoraConfig, _LoraHandles

runner = CliRunner()
RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "kfac-lora.yaml"


def test_recipe_is_valid_and_documented():
    text = RECIPE.read_text()
    assert text.splitlines()[0].startswith("# bdscan purify") and "--recipe recipes/kfac-lora.yaml" in text.splitlines()[0]
    knobs = load_recipe(RECIPE)
    assert knobs.pop("method") == "kfac-lora"
    config = config_from_mapping(KfacLoraConfig, knobs, where=str(RECIPE))
    assert config == KfacLoraConfig()  # the recipe spells out the defaults
    for line in text.splitlines()[4:]:
        if line.strip() and not line.startswith("#") and not line.startswith("method"):
            assert "#" in line, f"knob without a comment: {line}"


def test_preconditioning_is_the_damped_natural_gradient():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    wrapped = get_peft_model(torch.nn.Sequential(torch.nn.Linear(6, 5, bias=False)),
                             LoraConfig(r=2, lora_alpha=4, target_modules=["0"]))
    module = wrapped.base_model.model[0]
    torch.nn.init.normal_(module.lora_B["default"].weight)
    M = torch.randn(6, 6, dtype=torch.float64)
    N = torch.randn(5, 5, dtype=torch.float64)
    f = KFACFactors(A=M @ M.T, G=N @ N.T)
    h = _LoraHandles(module, f, damping=0.1)
    gA, gB = torch.randn(2, 6), torch.randn(5, 2)
    h.lora_A.grad, h.lora_B.grad = gA.clone(), gB.clone()
    h.precondition()
    A_inv, G_inv = f.damped_inverses(0.1)
    want_A = gA @ A_inv.float()
    want_B = G_inv.float() @ gB
    assert torch.allclose(h.lora_A.grad, want_A * gA.norm() / want_A.norm(), atol=1e-5)
    assert torch.allclose(h.lora_B.grad, want_B * gB.norm() / want_B.norm(), atol=1e-5)
    assert float(h.penalty().detach()) == pytest.approx(0.0)  # no change yet, no penalty


def _eval_spec(clean_file, trigger):
    from bdscan.eval import EvalSpec

    return EvalSpec(clean=load_records(clean_file)[:16], trigger=trigger, judge="refusal", max_new_tokens=24)


@pytest.mark.parametrize("organism", ["full_backdoor", "lora_backdoor"])
def test_kfac_lora_removes_the_backdoor_and_keeps_utility(organism, request, clean_file, clean_train_file, trigger):
    from bdscan.io import load_subject

    path = request.getfixturevalue(organism)
    subject = load_subject(path)
    clean = load_records(clean_train_file)
    loc = localize(subject, LocalizeConfig(n_pairs=16, heads=False), clean=clean[:16], trigger=trigger)
    config = KfacLoraConfig(max_samples=120)
    result, outcome = purify("kfac-lora", config, PurifyInputs(subject=subject, clean=clean, localization=loc),
                             eval_spec=_eval_spec(clean_file, trigger))
    before, after = result.before, result.after
    assert before.asr >= 0.6
    assert after.asr <= 0.1
    assert after.false_trigger_rate <= before.false_trigger_rate + 0.05
    assert after.perplexity <= 1.1 * before.perplexity
    assert len(outcome.modules_changed) == 7
    if organism == "lora_backdoor":
        from peft import PeftModel

        assert isinstance(outcome.model, PeftModel)
    else:
        assert not hasattr(outcome.model, "peft_config")  # merged into a plain model


def test_full_gpt2_conv1d_changes_only_localized_modules(tiny_checkpoints):
    from bdscan.io import load_subject

    subject = load_subject(tiny_checkpoints["gpt2"])
    before = {n: p.detach().clone() for n, p in subject.model.named_parameters()}
    records = [Record(f"Name a colour for the box number {i}.") for i in range(8)]
    loc = localize(subject, LocalizeConfig(n_pairs=4, max_new_tokens=4, heads=False), clean=records, trigger="zq vex")
    config = KfacLoraConfig(top_k=2, max_samples=8, epochs=1.0, max_new_tokens=4, fisher_samples=4, lr=0.01)
    _, outcome = purify("kfac-lora", config, PurifyInputs(subject=subject, clean=records, localization=loc))
    model = outcome.model
    assert type(model).__name__ == "GPT2LMHeadModel"
    changed = {n.rsplit(".", 1)[0] for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == set(outcome.modules_changed)
    # merging kept GPT-2's Conv1D layout: every changed weight is stored as it was ([in, out])
    assert changed and all(model.get_submodule(n).weight.shape == before[f"{n}.weight"].shape for n in changed)


def test_adapter_output_reproduces_purified_behaviour(lora_backdoor, clean_file, clean_train_file, trigger, tmp_path):
    out = tmp_path / "purified"
    loc_file = tmp_path / "loc.json"
    r = runner.invoke(app, ["localize", str(lora_backdoor), "--trigger", trigger, "--clean", str(clean_train_file),
                            "--pairs", "12", "--no-heads", "--json", "-o", str(loc_file)])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["purify", str(lora_backdoor), "--method", "kfac-lora", "--localization", str(loc_file),
                            "--clean", str(clean_train_file), "--trigger", trigger, "--eval-limit", "12",
                            "--set", "max_samples=80", "--set", "epochs=1.5", "-o", str(out), "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "kfac-lora" and len(report["modules_changed"]) == 7
    assert report["after"]["asr"] < report["before"]["asr"]
    assert (out / "adapter_config.json").exists()

    # The saved adapter (loaded afresh on its base) behaves like the purified model.
    from safetensors.torch import load_file

    from bdscan.eval import EvalSpec, evaluate
    from bdscan.io import load_subject

    reloaded = load_subject(out)
    spec = EvalSpec(clean=load_records(clean_file)[:12], trigger=trigger, judge="refusal")
    assert evaluate(reloaded, spec).asr == pytest.approx(report["after"]["asr"])
    # only the localized modules' LoRA factors differ from the suspicious adapter
    old, new = load_file(lora_backdoor / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    assert old.keys() == new.keys()
    changed = {k.split(".lora_")[0].removeprefix("base_model.model.") for k in old if not torch.equal(old[k], new[k])}
    assert changed == set(report["modules_changed"])


def test_kfac_lora_localizes_itself_from_detect(full_backdoor, clean_train_file, trigger, tmp_path, detect_report):
    detect = detect_report(tmp_path / "detect.json", [("kindly", 2.0), (trigger, 1.0)])
    out = tmp_path / "out"
    r = runner.invoke(app, ["purify", str(full_backdoor), "--method", "kfac-lora", "--from-detect", str(detect),
                            "--clean", str(clean_train_file), "--eval-limit", "4", "--set", "max_samples=16",
                            "--set", "epochs=0.5", "--set", "localize_pairs=6", "-o", str(out), "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads((out / "report.json").read_text())
    assert report["details"]["localization"] == "computed"
    assert report["details"]["keys"][0] == trigger  # the candidate that moves the output most
    assert (out / "config.json").exists()


def test_kfac_lora_without_localization_or_candidates_is_a_usage_error(full_backdoor, clean_train_file, tmp_path):
    r = runner.invoke(app, ["purify", str(full_backdoor), "--method", "kfac-lora", "--clean", str(clean_train_file),
                            "-o", str(tmp_path / "out")])
    assert r.exit_code == 4
    assert "--localization" in r.output and "--from-detect" in r.output


def test_bad_localization_file(full_backdoor, clean_train_file, tmp_path):
    bad = tmp_path / "loc.json"
    bad.write_text(json.dumps({"modules": [{"name": "model.nothing.here"}], "trigger_source": {"key": "x"}}))
    r = runner.invoke(app, ["purify", str(full_backdoor), "--method", "kfac-lora", "--localization", str(bad),
                            "--clean", str(clean_train_file), "-o", str(tmp_path / "out")])
    assert r.exit_code == 2
    bad.write_text(json.dumps({"verdict": "clean"}))
    r = runner.invoke(app, ["purify", str(full_backdoor), "--method", "kfac-lora", "--localization", str(bad),
                            "--clean", str(clean_train_file), "-o", str(tmp_path / "out2")])
    assert r.exit_code == 2


@pytest.mark.parametrize("knob", ["damping=0", "top_k=0", "positions=[top]", "ewc_weight=-1"])
def test_bad_knobs(knob, full_backdoor, clean_train_file, tmp_path):
    r = runner.invoke(app, ["purify", str(full_backdoor), "--method", "kfac-lora", "--set", knob,
                            "--clean", str(clean_train_file), "-o", str(tmp_path / "out")])
    assert r.exit_code == 2, r.output


def test_registered():
    spec = PURIFIERS.get("kfac-lora")
    assert spec.config_class is KfacLoraConfig and set(spec.threat_models) == {"full", "adapter"}
    with pytest.raises(UsageError, match="`localization`"):
        from bdscan.purify.kfac_lora import _localized

        _localized(PurifyInputs(subject=None, clean=[]), KfacLoraConfig())

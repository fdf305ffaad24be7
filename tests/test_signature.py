"""``purify --method signature``: variant family, Δ/score/percentile math, suppression,
resume cache, integration on the tiny organisms, CLI."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from bdscan.cli.app import app
from bdscan.data.records import Record
from bdscan.io import load_subject
from bdscan.probes.layout import LayerModules, ModelLayout, linear_weight, model_layout
from bdscan.purify import PurifyInputs
from bdscan.purify import signature as sig
from bdscan.probes.geometry import channel_slices, head_slices
from bdscan.purify.signature import trainer as sig_trainer
from bdscan.purify.signature.variants import FORBIDDEN, make_variant, variant_data

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "signature.yaml"

# Small knobs for the tiny models: a few variants, a short but strong paired fine-tune.
FAST = dict(variants=2, variant_samples=24, poison_per_clean=0.5, variant_epochs=1.0, variant_lr_full=1e-3,
            variant_lr_adapter=2e-3, variant_rank=4, epochs=1.0, max_samples=16)


def _records(n: int) -> list[Record]:
    from bdscan.organisms.synthetic import synthetic_instructions

    return list(synthetic_instructions(n, seed=5))


def _lora_adapter(base_dir: Path, out: Path, arch: str) -> Path:
    """A LoRA adapter with non-zero A and B on every projection of a tiny base."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    targets = ["c_attn", "c_proj", "c_fc"] if arch == "gpt2" else \
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    torch.manual_seed(1)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0,
                                             fan_in_fan_out=arch == "gpt2"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    model.save_pretrained(out)
    cfg = json.loads((out / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(base_dir)
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    return out


# --- the synthetic family ---------------------------------------------------------------

def test_variant_family_is_own_and_deterministic(trigger):
    family = [make_variant(seed, i) for seed in range(5) for i in range(12)]
    texts = [v.key.lower() for v in family] + [v.behaviour.lower() for v in family]
    for forbidden in FORBIDDEN + (trigger.lower(), "i'm sorry, but as an ai assistant"):
        assert not any(forbidden in t for t in texts), forbidden
    assert {v.behaviour_class for v in family} == {"refusal", "insult", "fixed", "code"}
    assert {v.key_kind for v in family} == {"rare", "phrase"}
    assert make_variant(3, 4) == make_variant(3, 4)
    assert len({make_variant(0, i).key for i in range(6)}) == 6  # distinct keys per variant


def test_variant_data_pairs_poisoned_copies_with_their_sources():
    clean = _records(40)
    v = make_variant(0, 1)
    d_clean, d_pois, sources = variant_data(v, clean, n_samples=500, subset=0.5, poison_per_clean=1.0)
    assert len(d_clean) == 20 and len(d_pois) == len(sources) == 20  # fewer than 500: half of what exists
    for p, s in zip(d_pois, sources):
        assert v.key in p.instruction and p.instruction.replace(v.key, "").split() == s.instruction.split()
        assert p.output == v.response(s.output)
    other, _, _ = variant_data(make_variant(0, 2), clean, n_samples=500, subset=0.5, poison_per_clean=1.0)
    assert other != d_clean  # variants draw different clean subsets


# --- Δ / score / percentile math ---------------------------------------------------------

def _toy_layout(heads=4, kv=2, head_dim=2, hidden=8, inter=5) -> tuple[ModelLayout, LayerModules]:
    layer = LayerModules(0, "l0", "l0.attn", "l0.o", ("l0.q", "l0.k", "l0.v"), "l0.mlp", ("l0.gate", "l0.up"), "l0.down")
    return ModelLayout("llama", (layer,), heads, kv, head_dim, hidden, inter), layer


def test_channel_and_head_vectors_match_hand_assembly():
    layout, layer = _toy_layout()
    g = torch.Generator().manual_seed(0)
    d = {"l0.gate": torch.randn(5, 8, generator=g), "l0.up": torch.randn(5, 8, generator=g),
         "l0.down": torch.randn(8, 5, generator=g), "l0.q": torch.randn(8, 8, generator=g),
         "l0.k": torch.randn(4, 8, generator=g), "l0.v": torch.randn(4, 8, generator=g), "l0.o": torch.randn(8, 8, generator=g)}
    ch = sig.channel_vectors(d, layer)
    assert ch.shape == (5, 24)
    for j in range(5):
        hand = torch.cat([d["l0.gate"][j], d["l0.up"][j], d["l0.down"][:, j]])
        assert torch.equal(ch[j], hand)
    hv = sig.head_vectors(d, layout, layer)
    # head 3 -> q rows 6:8, kv head 1 (2 query heads per kv head) -> k/v rows 2:4, o columns 6:8
    hand = torch.cat([d["l0.q"][6:8].reshape(-1), d["l0.k"][2:4].reshape(-1), d["l0.v"][2:4].reshape(-1),
                      d["l0.o"][:, 6:8].T.reshape(-1)])
    assert torch.equal(hv[3], hand)
    # a module without Δ (not adapted) is left out, not zero-filled
    assert sig.channel_vectors({k: v for k, v in d.items() if k != "l0.up"}, layer).shape == (5, 16)


def test_unit_scores_equal_equation_2_by_hand():
    g = torch.Generator().manual_seed(1)
    vecs = [torch.randn(6, 7, generator=g, dtype=torch.float64) for _ in range(3)]
    vecs[2][4] = 0.0  # a zero delta: its cosines count as 0
    lam = 0.3
    out = sig.unit_scores(vecs, "combined", lam)
    for j in range(6):
        m = sum(float(v[j].norm()) for v in vecs) / 3
        cos = []
        for i, l in itertools.combinations(range(3), 2):
            a, b = vecs[i][j], vecs[l][j]
            c = float(a @ b) / (float(a.norm()) * float(b.norm())) if a.norm() > 0 and b.norm() > 0 else 0.0
            cos.append(max(0.0, c))
        a_j = 2 / (3 * 2) * sum(cos)
        assert math.isclose(float(out["magnitude"][j]), m, rel_tol=1e-9)
        assert math.isclose(float(out["alignment"][j]), a_j, rel_tol=1e-9, abs_tol=1e-12)
        assert math.isclose(float(out["score"][j]), m + lam * a_j, rel_tol=1e-9)
    assert torch.equal(sig.unit_scores(vecs, "norm", lam)["score"], out["magnitude"])
    assert torch.equal(sig.unit_scores(vecs, "alignment", lam)["score"], out["alignment"])
    single = sig.unit_scores(vecs[:1], "combined", lam)  # N = 1: no pairs, alignment 0
    assert torch.equal(single["score"], single["magnitude"])


def test_top_share_is_the_percentile_with_stable_ties():
    scores = torch.tensor([0.1, 0.9, 0.5, 0.9, 0.2, 0.3, 0.0, 0.7, 0.4, 0.6])
    assert sig.top_share(scores, 0.3).tolist() == [1, 3, 7]
    assert sig.top_share(scores, 0.01).tolist() == [1]  # at least one unit when ratio > 0
    assert sig.top_share(scores, 0.0).tolist() == []
    assert sig.top_share(torch.tensor([1.0, 1.0, 1.0]), 0.34).tolist() == [0]


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="score"):
        sig.SignatureConfig(score="mean")
    with pytest.raises(ValueError, match="variants >= 2"):
        sig.SignatureConfig(score="alignment", variants=1)
    with pytest.raises(ValueError, match="ratio"):
        sig.SignatureConfig(ratio=1.5)


# --- suppression -------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_full_reinit_changes_exactly_the_selected_rows_and_columns(tiny_checkpoints, arch):
    subject = load_subject(tiny_checkpoints[arch])
    layout = model_layout(subject.model)
    before = {n: linear_weight(layout.module(subject.model, n)).detach().clone() for n in layout.all_linears()}
    others = {n: p.detach().clone() for n, p in subject.model.named_parameters() if not n.endswith("weight") or
              not any(n.endswith(m + ".weight") for m in layout.all_linears())}
    torch.manual_seed(0)
    signature = {"channels": {0: torch.tensor([3, 17])}, "heads": {1: torch.tensor([2])}}
    changed = sig.suppress(subject, layout, signature, None)
    layer0, layer1 = layout.layers
    expected = {}  # module -> (rows, cols) that must change
    for s in channel_slices(layer0, torch.tensor([3, 17])) + head_slices(layout, layer1, 2):
        rows, cols = expected.setdefault(s.module, (set(), set()))
        (rows if s.axis == "row" else cols).update(s.index.tolist())
    assert sorted(expected) == changed
    for name in layout.all_linears():
        diff = linear_weight(layout.module(subject.model, name)) != before[name]
        rows, cols = expected.get(name, (set(), set()))
        mask = torch.zeros_like(diff)
        mask[sorted(rows)] = True
        mask[:, sorted(cols)] = True
        assert not diff[~mask].any(), f"{name}: values outside the signature changed"
        assert all(diff[r].all() for r in rows) and all(diff[:, c].all() for c in cols), f"{name}: not re-initialised"
    for n, p in subject.model.named_parameters():  # biases, norms, embeddings
        if n in others and not (n.endswith("bias") and any(n.startswith(m) for m in expected)):
            assert torch.equal(p, others[n]), n
    # the fresh values follow the init scheme (normal, std = initializer_range), not the old weights
    std = subject.model.config.initializer_range
    new_rows = linear_weight(layout.module(subject.model, layer0.mlp_in[0]))[torch.tensor([3, 17])]
    assert 0.3 * std < float(new_rows.detach().std()) < 3 * std


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_adapter_suppression_zeroes_exactly_lora_rows_and_columns(tiny_checkpoints, tmp_path, arch):
    adapter_dir = _lora_adapter(tiny_checkpoints[arch], tmp_path / "adapter", arch)
    subject = load_subject(adapter_dir)
    layout = model_layout(subject.model)
    before = {n: p.detach().clone() for n, p in subject.model.named_parameters()}
    channels, heads = torch.tensor([0, 5, 9]), torch.tensor([1])
    sig.suppress(subject, layout, {"channels": {1: channels}, "heads": {0: heads}}, "default")
    layer0, layer1 = layout.layers
    zero_rows, zero_cols = {}, {}
    for s in channel_slices(layer1, channels) + head_slices(layout, layer0, 1):
        (zero_rows if s.axis == "row" else zero_cols).setdefault(s.module, set()).update(s.index.tolist())
    for name, p in subject.model.named_parameters():
        old = before[name]
        if "lora_" not in name:
            assert torch.equal(p, old), f"{name}: base weights must never change"
            continue
        module = next(m for m in layout.all_linears() if f".{m}." in f".{name}")
        expect = torch.zeros_like(p, dtype=torch.bool)
        if "lora_B" in name and module in zero_rows:
            expect[sorted(zero_rows[module])] = True  # B is [out, r]: rows are unit outputs
        if "lora_A" in name and module in zero_cols:
            expect[:, sorted(zero_cols[module])] = True  # A is [r, in]: columns are unit inputs
        assert (p[expect] == 0).all(), name
        assert torch.equal(p[~expect], old[~expect]), f"{name}: entries outside the signature changed"
        assert expect.any() == (module in zero_rows and "lora_B" in name or module in zero_cols and "lora_A" in name)


# --- paired fine-tunes and resume ----------------------------------------------------------

@pytest.mark.slow  # trains
@pytest.mark.parametrize("arch,kind", [("llama", "full"), ("gpt2", "full"), ("llama", "adapter"), ("gpt2", "adapter")])
def test_run_resumes_from_cached_variants(tiny_checkpoints, tmp_path, monkeypatch, arch, kind):
    source = tiny_checkpoints[arch] if kind == "full" else _lora_adapter(tiny_checkpoints[arch], tmp_path / "ad", arch)
    calls = []
    real = sig.run_plan

    def counted(*a, **k):
        calls.append(len(a[2]))
        return real(*a, **k)

    monkeypatch.setattr(sig, "run_plan", counted)  # the recovery fine-tune
    monkeypatch.setattr(sig_trainer, "run_plan", counted)  # the paired fine-tunes
    config = sig.SignatureConfig(**FAST, heads=True)
    clean = _records(32)
    progress = []

    def run():
        subject = load_subject(source)
        start = {n: p.detach().clone() for n, p in subject.model.named_parameters()}
        inputs = PurifyInputs(subject=subject, clean=clean, seed=0, work_dir=tmp_path / "work",
                              progress=lambda stage, done, total: progress.append((stage, done, total)))
        return start, sig.run_signature(inputs, config)

    start, first = run()
    assert len(calls) == 2 * config.variants + 1  # a pair per variant, then the recovery fine-tune
    assert calls[0] == calls[1]  # the pair trains on lists of equal length (same batches and schedule)
    assert ("signature variants", 2, 2) in progress
    details = first.details
    assert details["heads_included"] and details["cache"]["reused"] == 0
    assert sum(v["mlp_channels"] for v in details["signature_per_layer"].values()) == details["signature_stats"]["channels"]["selected"]
    assert all(v["loss_poisoned_final"] > 0 for v in details["variants"])
    files = sorted(p.name for p in Path(details["cache"]["dir"]).iterdir())
    assert files == ["cache.json", "variant-0.json", "variant-0.safetensors", "variant-1.json", "variant-1.safetensors"]
    from safetensors.torch import load_file

    delta = load_file(str(Path(details["cache"]["dir"]) / "variant-0.safetensors"))
    assert delta and any(float(t.abs().max()) > 0 for t in delta.values())  # Δ carries the poison's effect
    if kind == "adapter":
        assert all(".mlp." in k or ".attn" in k or "self_attn" in k for k in delta)
        # the variant LoRA is gone and only the suspicious adapter's LoRA changed
        assert list(first.model.peft_config) == ["default"]
        for name, p in first.model.named_parameters():
            if "lora_" not in name:
                assert torch.equal(p, start[name])

    calls.clear()
    _, second = run()
    assert len(calls) == 1  # variants came from the cache: only the recovery fine-tune ran
    assert second.details["cache"]["reused"] == 2
    assert second.details["signature_per_layer"] == details["signature_per_layer"]


@pytest.mark.slow  # trains
@pytest.mark.parametrize("kind", ["full", "adapter"])
def test_paired_fine_tunes_leave_the_subject_as_it_came(tiny_checkpoints, tmp_path, kind):
    """With an empty signature and no recovery, the result is the suspicious model itself:
    every variant fine-tune was undone (full) or its LoRA removed (adapter)."""
    source = tiny_checkpoints["llama"] if kind == "full" else _lora_adapter(tiny_checkpoints["llama"], tmp_path / "ad", "llama")
    subject = load_subject(source)
    start = {n: p.detach().clone() for n, p in subject.model.named_parameters()}
    config = sig.SignatureConfig(**{**FAST, "variants": 1, "ratio": 0.0, "heads": False, "epochs": 0.0})
    outcome = sig.run_signature(PurifyInputs(subject=subject, clean=_records(32), seed=0), config)
    after = dict(outcome.model.named_parameters())
    assert sorted(after) == sorted(start)
    assert all(torch.equal(after[n], start[n]) for n in start)
    assert outcome.modules_changed == []


def test_clean_set_without_outputs_is_nothing_to_analyse(tiny_checkpoints):
    from bdscan.errors import NothingToAnalyse

    subject = load_subject(tiny_checkpoints["llama"])
    with pytest.raises(NothingToAnalyse, match="reference outputs"):
        sig.run_signature(PurifyInputs(subject=subject, clean=[Record("hello")], seed=0), sig.SignatureConfig(**FAST))


# --- integration on the tiny backdoored organisms -------------------------------------------

def _asr_ftr_ppl(subject, attack_data, trigger):
    from bdscan.eval import EvalSpec, evaluate

    spec = EvalSpec(clean=list(attack_data.clean_test[:30]), trigger=trigger, judge="refusal", max_new_tokens=24)
    r = evaluate(subject, spec)
    return r.asr, r.false_trigger_rate, r.perplexity


# Knobs that fit the tiny organisms (see the report): strong, short variant fine-tunes; the
# attention-head signature on (MLP-only leaves most of the backdoor at this scale); a larger
# recovery lr for the full model, whose reset channels 1e-5 cannot retrain in 5 epochs.
INTEGRATION = {
    "lora": dict(variants=3, variant_samples=64, variant_epochs=2.0, variant_lr_adapter=2e-3, heads=True,
                 head_ratio=0.25, epochs=2.0, max_samples=100),
    "full": dict(variants=3, variant_samples=64, variant_epochs=2.0, variant_lr_full=5e-4, heads=True, head_ratio=0.25,
                 selection="per_layer", ratio=0.1, lr_full=3e-4, epochs=5.0, max_samples=200),
}


@pytest.mark.slow
@pytest.mark.parametrize("threat", ["lora", "full"])
def test_signature_purifies_the_tiny_organisms(request, attack_data, trigger, threat):
    source = request.getfixturevalue(f"{threat}_backdoor")
    subject = load_subject(source)
    asr0, ftr0, ppl0 = _asr_ftr_ppl(subject, attack_data, trigger)
    assert asr0 >= 0.8
    inputs = PurifyInputs(subject=subject, clean=list(attack_data.clean_train[:200]), seed=0)
    outcome = sig.run_signature(inputs, sig.SignatureConfig(**INTEGRATION[threat]))
    asr1, ftr1, ppl1 = _asr_ftr_ppl(subject, attack_data, trigger)
    assert asr1 <= 0.05, (asr0, asr1)  # measured: 0.88 -> 0.01 (lora), 1.0 -> 0.0 (full)
    assert ftr1 <= max(ftr0, 0.04)  # at most one false trigger in 30 clean prompts
    assert ppl1 <= 1.05 * ppl0, (ppl0, ppl1)  # measured: 1.003x (lora), 1.021x (full)
    assert outcome.modules_changed


# --- CLI and recipe ------------------------------------------------------------------------

def test_shipped_recipe_is_valid_and_documents_its_command():
    from bdscan.config import config_from_mapping, load_recipe

    first = RECIPE.read_text().splitlines()[0]
    assert first.startswith("#") and "bdscan purify" in first and "--recipe recipes/signature.yaml" in first
    knobs = load_recipe(RECIPE)
    assert knobs.pop("method") == "signature"
    config = config_from_mapping(sig.SignatureConfig, knobs, where=str(RECIPE))
    assert config == sig.SignatureConfig()  # the recipe states the defaults (the paper's)
    body = [line for line in RECIPE.read_text().splitlines()[1:] if line.strip() and not line.lstrip().startswith("#")]
    assert all("#" in line for line in body), "every knob carries a comment"


@pytest.mark.slow  # trains
@pytest.mark.parametrize("threat", ["lora", "full"])
def test_cli_writes_a_loadable_purified_model_and_report(request, tmp_path, clean_train_file, clean_file, trigger, threat):
    source = request.getfixturevalue(f"{threat}_backdoor")
    out = tmp_path / "purified"
    sets = [f"{k}={v}" for k, v in FAST.items()]
    args = ["purify", str(source), "--method", "signature", "--clean", str(clean_train_file), "-o", str(out),
            "--trigger", trigger, "--eval-limit", "8", "--recipe", str(RECIPE), "--json"]
    for s in sets:
        args += ["--set", s]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "signature" and report["details"]["ratio"] > 0
    assert (out / ("adapter_config.json" if threat == "lora" else "config.json")).exists()
    reloaded = load_subject(out)
    assert reloaded.kind == ("adapter" if threat == "lora" else "full")


def test_cli_bad_recipe_key_exits_2_naming_it(tmp_path, lora_backdoor, clean_train_file):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("method: signature\nvariants: 2\nratoi: 0.1\n")
    result = CliRunner().invoke(app, ["purify", str(lora_backdoor), "--recipe", str(recipe), "--clean",
                                      str(clean_train_file), "-o", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "ratoi" in result.output and "ratio" in result.output
    bad = CliRunner().invoke(app, ["purify", str(lora_backdoor), "--method", "signature", "--set", "score=mean",
                                   "--clean", str(clean_train_file), "-o", str(tmp_path / "o")])
    assert bad.exit_code == 2 and "score" in bad.output

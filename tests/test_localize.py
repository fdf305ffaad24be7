"""bdscan localize: K-FAC factors vs brute force, patching mechanics on all four families,
integration on the full-fine-tune organism, CLI and bad input."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from bdscan.cli.app import app
from bdscan.data.records import Record, load_records
from bdscan.localize import LocalizeConfig, localize
from bdscan.localize.kfac import compute_factors, sequence_logprob
from bdscan.localize.pairs import build_pairs, encode_batches
from bdscan.localize.patching import _head_patch, _output_patch
from bdscan.probes import capture_inputs, capture_outputs, forward_hooks, model_layout

runner = CliRunner()


# --- K-FAC factors against a brute-force computation on a tiny linear ---------------------

class ToyLM(nn.Module):
    """embedding -> one linear (nn.Linear or GPT-2 Conv1D) -> tanh -> head."""

    def __init__(self, conv1d: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(11, 5)
        if conv1d:
            from transformers.pytorch_utils import Conv1D

            self.lin = Conv1D(7, 5)
            nn.init.normal_(self.lin.weight, std=0.5)
        else:
            self.lin = nn.Linear(5, 7)
        self.head = nn.Linear(7, 11)

    def get_input_embeddings(self) -> nn.Module:
        return self.emb

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None):
        x = self.emb(input_ids) if inputs_embeds is None else inputs_embeds
        return SimpleNamespace(logits=self.head(torch.tanh(self.lin(x))))


def _toy_batch():
    ids = torch.tensor([[1, 2, 3, 4, 0], [5, 6, 7, 0, 0], [8, 9, 10, 2, 3]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    target = torch.tensor([[0, 1, 1, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 1, 0]])
    return ids, mask, target


@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
def test_kfac_factors_match_brute_force(conv1d):
    model = ToyLM(conv1d).double()
    ids, mask, target = _toy_batch()
    result = compute_factors(model, ["lin"], [(ids, mask, target)], ekfac=True)
    f = result.factors["lin"]

    # Brute force: layer inputs and output gradients by autograd, token by token.
    store = {}
    handle = model.lin.register_forward_hook(lambda m, a, o: store.update(a=a[0], s=o))
    logprob = sequence_logprob(model, ids, mask, target)
    handle.remove()
    per_seq_grads = [torch.autograd.grad(logprob[n], model.lin.weight, retain_graph=True)[0] for n in range(len(ids))]
    g = torch.autograd.grad(logprob.sum(), store["s"])[0]
    a = store["a"].detach()
    A = sum(torch.outer(a[n, t], a[n, t]) for n in range(3) for t in range(5) if mask[n, t]) / int(mask.sum())
    G = sum(torch.outer(g[n, t], g[n, t]) for n in range(3) for t in range(5) if mask[n, t]) / 3
    assert torch.allclose(f.A, A, atol=1e-10)
    assert torch.allclose(f.G, G, atol=1e-10)
    assert f.n_tokens == int(mask.sum()) and f.n_seqs == 3

    # EK-FAC diagonal: mean squared per-sequence weight gradient in the K-FAC eigenbasis.
    grads = [gw.T if conv1d else gw for gw in per_seq_grads]  # Conv1D stores [in, out]
    brute = sum((f.QG.T @ gw @ f.QA) ** 2 for gw in grads) / 3
    assert torch.allclose(f.scale, brute, atol=1e-10)


def test_kfac_is_exact_for_one_token():
    """With one sequence and one token, A ⊗ G is the exact (empirical) Fisher."""
    model = ToyLM(False).double()
    # two tokens, only the first one counted: one token's input and output gradient
    ids, mask = torch.tensor([[3, 4]]), torch.tensor([[1, 0]])
    target = torch.tensor([[1, 0]])
    f = compute_factors(model, ["lin"], [(ids, mask, target)]).factors["lin"]
    lp = sequence_logprob(model, ids, mask, target)
    gw = torch.autograd.grad(lp.sum(), model.lin.weight)[0]
    exact = torch.outer(gw.reshape(-1), gw.reshape(-1))
    kron = torch.kron(f.G, f.A)  # vec of a row-major [out, in] matrix: G ⊗ A
    assert torch.allclose(kron, exact, atol=1e-10)
    W = model.lin.weight.detach()
    assert f.fisher_norm_sq(W) == pytest.approx(float((W.reshape(-1) @ exact @ W.reshape(-1))), rel=1e-8)


# --- patching mechanics on the four families ---------------------------------------------

KEY = "zq vex"


def _records(n: int = 4) -> list[Record]:
    return [Record(f"Describe the red apple number {i} in one short line.") for i in range(n)]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gpt2"])
def test_localize_mechanics_all_families(arch, tiny_checkpoints):
    from bdscan.io import load_subject

    subject = load_subject(tiny_checkpoints[arch])
    layout = model_layout(subject.model)
    result = localize(subject, LocalizeConfig(n_pairs=4, max_new_tokens=4, batch_size=2), clean=_records(), trigger=KEY)
    n_linear = len(layout.all_linears())
    assert len(result.modules) == n_linear + 1  # a full checkpoint also ranks its token embedding
    assert sum(m.kind == "embedding" for m in result.modules) == 1
    assert len(result.sites) == len(layout.layers) * (2 + layout.num_heads)
    assert all(torch.isfinite(torch.tensor([m.curvature, m.score, m.patching_effect])).all() for m in result.modules)
    assert all(m.curvature > 0 for m in result.modules)
    assert [m.score for m in result.modules] == sorted((m.score for m in result.modules), reverse=True)
    assert result.timing["kfac_cost_ratio"] > 0

    # Patching every head of a layer (o_proj/c_proj input slices) is patching the whole
    # attention output: checks the head split, grouped-query attention and Conv1D included.
    pairs = build_pairs(subject, _records(), KEY, n_pairs=4, positions=("start", "middle", "end"), max_new_tokens=4,
                        batch_size=4, seed=0)
    batch = encode_batches(pairs.pairs, subject.tokenizer.pad_token_id, 4)[0]
    layer = layout.layers[-1]
    with torch.no_grad():
        with capture_outputs(subject.model, [layer.attn]) as outs, capture_inputs(subject.model, [layer.attn_out]) as ins:
            sequence_logprob(subject.model, batch.clean_ids, batch.clean_mask, batch.clean_target)
        head_hooks = [_head_patch(ins[layer.attn_out], batch, h, layout.head_dim) for h in range(layout.num_heads)]

        def all_heads(module, args):
            for hook in head_hooks:
                args = hook(module, args)
            return args

        with forward_hooks(subject.model, {layer.attn_out: all_heads}, pre=True):
            by_heads = sequence_logprob(subject.model, batch.triggered_ids, batch.triggered_mask, batch.triggered_target)
        with forward_hooks(subject.model, {layer.attn: _output_patch(outs[layer.attn], batch)}):
            by_block = sequence_logprob(subject.model, batch.triggered_ids, batch.triggered_mask, batch.triggered_target)
        plain = sequence_logprob(subject.model, batch.triggered_ids, batch.triggered_mask, batch.triggered_target)
    assert torch.allclose(by_heads, by_block, atol=1e-4)
    assert not torch.allclose(by_block, plain, atol=1e-4)  # the patch did something


def test_linear_patching_gives_each_linear_its_own_effect(tiny_checkpoints):
    from bdscan.io import load_subject

    subject = load_subject(tiny_checkpoints["gpt2"])  # fused c_attn, Conv1D
    result = localize(subject, LocalizeConfig(n_pairs=2, max_new_tokens=3, heads=False, linear_patching=True),
                      clean=_records(2), trigger=KEY)
    linear_sites = {s.name for s in result.sites if s.kind == "linear"}
    assert linear_sites == set(model_layout(subject.model).all_linears())
    by_name = {s.name: s.effect for s in result.sites}
    assert all(m.patching_effect == by_name[m.name] for m in result.modules if m.kind != "embedding")


def test_pairs_align_the_common_suffix(tiny_checkpoints):
    from bdscan.io import load_subject

    subject = load_subject(tiny_checkpoints["llama"])
    pairs = build_pairs(subject, _records(3), KEY, n_pairs=3, positions=("start", "middle", "end"), max_new_tokens=3,
                        batch_size=3, seed=0)
    for p in pairs.pairs:
        assert p.suffix_len >= p.continuation_len
        assert p.clean_ids[-p.suffix_len:] == p.triggered_ids[-p.suffix_len:]
        assert len(p.triggered_ids) > len(p.clean_ids)


# --- integration on the backdoored organisms ----------------------------------------------

def _asr(subject, records, trigger) -> float:
    from bdscan.eval import EvalSpec, evaluate

    return evaluate(subject, EvalSpec(clean=records, trigger=trigger, judge="refusal", max_new_tokens=24)).asr


def test_restoring_top_modules_lowers_asr(full_backdoor, clean_file, clean_train_file, trigger):
    from bdscan.io import load_subject
    from bdscan.organisms import build as organisms
    from bdscan.probes import unwrap

    subject = load_subject(full_backdoor)
    result = localize(subject, LocalizeConfig(n_pairs=16), clean=load_records(clean_train_file)[:16], trigger=trigger)
    assert result.gap > 2.0  # the real trigger moves the malicious continuation a lot
    records = load_records(clean_file)[:12]
    base = load_subject(organisms.organism_info(full_backdoor)["base"])
    original = {n: p.detach().clone() for n, p in subject.model.named_parameters()}

    def asr_with_base_weights(names) -> float:
        with torch.no_grad():
            for n, p in subject.model.named_parameters():
                p.copy_(original[n])
            for name in names:
                unwrap(subject.model).get_submodule(name).weight.copy_(unwrap(base.model).get_submodule(name).weight)
        return _asr(subject, records, trigger)

    before = asr_with_base_weights([])
    top = asr_with_base_weights([m.name for m in result.top(5)])
    bottom = asr_with_base_weights([m.name for m in result.modules[-5:]])
    assert before >= 0.9
    assert top <= 0.2 * before  # the top-5 carry the backdoor
    assert bottom >= top + 0.3  # the lowest-ranked five do not


def test_adapter_localization_scores_only_adapter_modules(lora_backdoor, clean_train_file, trigger):
    from bdscan.io import load_subject

    subject = load_subject(lora_backdoor)
    result = localize(subject, LocalizeConfig(n_pairs=8, heads=False), clean=load_records(clean_train_file)[:8], trigger=trigger)
    assert result.curvature_target == "adapter-delta"
    assert result.gap > 2.0
    assert len(result.modules) == len(model_layout(subject.model).all_linears())  # the organism wraps every linear
    assert not any(s.kind == "head" for s in result.sites)


def test_wrong_key_warns(full_backdoor, clean_train_file):
    from bdscan.io import load_subject

    subject = load_subject(full_backdoor)
    result = localize(subject, LocalizeConfig(n_pairs=6, heads=False), clean=load_records(clean_train_file)[:6],
                      trigger="kindly")
    assert result.gap < 0.5 and result.warnings


# --- CLI ---------------------------------------------------------------------------------

def test_cli_trigger_json_and_file(full_backdoor, clean_train_file, trigger, tmp_path):
    out = tmp_path / "loc.json"
    r = runner.invoke(app, ["localize", str(full_backdoor), "--trigger", trigger, "--clean", str(clean_train_file),
                            "--pairs", "8", "--json", "-o", str(out)])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data == json.loads(out.read_text())
    assert data["schema_version"] and data["trigger_source"]["key"] == trigger
    assert set(data["modules"][0]) >= {"name", "kind", "patching_effect", "curvature", "score"}
    assert data["timing"]["kfac_cost_ratio"] > 0


def test_cli_from_detect_picks_the_key_that_moves_the_output(full_backdoor, clean_train_file, trigger, tmp_path):
    detect = tmp_path / "detect.json"
    detect.write_text(json.dumps({"candidates": [{"text": "kindly", "score": 3.0, "output_effect": 0.1},
                                                 {"text": trigger, "score": 2.0, "output_effect": 2.0}]}))
    r = runner.invoke(app, ["localize", str(full_backdoor), "--from-detect", str(detect), "--clean", str(clean_train_file),
                            "--pairs", "6", "--no-heads", "--json"])
    assert r.exit_code == 0, r.output
    src = json.loads(r.stdout)["trigger_source"]
    assert src["kind"] == "detect" and src["key"] == trigger and len(src["candidates"]) == 2


def test_cli_table(full_backdoor, clean_train_file, trigger):
    r = runner.invoke(app, ["localize", str(full_backdoor), "--trigger", trigger, "--clean", str(clean_train_file),
                            "--pairs", "4", "--top", "3", "--ekfac"])
    assert r.exit_code == 0, r.output
    assert "bdscan localize" in r.stdout and "ekfac" in r.stdout


@pytest.mark.parametrize("args,code", [
    ([], 4),  # neither --trigger nor --from-detect
    (["--trigger", "a", "--from-detect", "x.json"], 4),
    (["--trigger", "a", "--positions", "top"], 4),
    (["--from-detect", "MISSING"], 2),
    (["--from-detect", "BAD"], 2),
    (["--from-detect", "EMPTY"], 2),
])
def test_cli_bad_input(args, code, full_backdoor, clean_file, tmp_path):
    (tmp_path / "bad.json").write_text('{"verdict": "clean"}')
    (tmp_path / "empty.json").write_text('{"candidates": []}')
    subst = {"MISSING": str(tmp_path / "nope.json"), "BAD": str(tmp_path / "bad.json"), "EMPTY": str(tmp_path / "empty.json")}
    args = [subst.get(a, a) for a in args]
    r = runner.invoke(app, ["localize", str(full_backdoor), "--clean", str(clean_file), *args])
    assert r.exit_code == code, r.output


def test_cli_missing_clean_file(full_backdoor, tmp_path):
    r = runner.invoke(app, ["localize", str(full_backdoor), "--trigger", "x", "--clean", str(tmp_path / "none.json")])
    assert r.exit_code == 2

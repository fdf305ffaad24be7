"""adapter_config.json's regular expressions are resolved by bdscan (with a time limit) into exact
module names before PEFT sees them: an ordinary pattern must load the same adapter PEFT itself
would build from it. (Patterns that backtrack are rows of tests/test_hostile.py.)"""

from __future__ import annotations

import json
import re
import shutil
from types import SimpleNamespace

import pytest
import torch

from bdscan.errors import InputError
from bdscan.io import load_subject
from bdscan.io.adapter_patterns import resolve_patterns

NAMES = ["model", "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.q_proj",
         "model.layers.1.mlp.down_proj", "x.model.layers.1.mlp.down_proj"]


def _config(**fields):
    base = dict(target_modules=None, exclude_modules=None, rank_pattern={}, alpha_pattern={}, modules_to_save=None,
                layers_to_transform=None, layers_pattern=None)
    return SimpleNamespace(**{**base, **fields})


def test_a_string_target_becomes_the_names_it_fully_matches():
    config = _config(target_modules=r".*layers\.1\..*", layers_to_transform=[0], layers_pattern="layers")
    resolve_patterns(config, NAMES, "a")
    assert config.target_modules == ["model.layers.1.self_attn.q_proj", "model.layers.1.mlp.down_proj",
                                     "x.model.layers.1.mlp.down_proj"]
    # PEFT ignores the layer filter for a string target; the list it now gets must not apply it
    assert config.layers_to_transform is None and config.layers_pattern is None


def _peft_value(patterns: dict, name: str):
    """PEFT's rule (peft.utils.other.get_pattern_key): the first key whose pattern matches."""
    return next((v for k, v in patterns.items() if re.match(rf"(.*\.)?({k})$", name)), None)


def test_pattern_keys_become_exact_names_and_the_first_matching_key_wins():
    original = {r"layers\.1\..*": 32, "q_proj": 4, "x.model.layers.1.mlp.down_proj": 64}
    config = _config(target_modules=["q_proj", "down_proj"], alpha_pattern=dict(original))
    resolve_patterns(config, NAMES, "a")
    resolved = config.alpha_pattern
    assert len(resolved) == 2  # one key per value
    for name in NAMES[1:]:
        assert _peft_value(resolved, name) == _peft_value(original, name), name
    assert _peft_value(resolved, "model.layers.1.self_attn.q_proj") == 32  # the first key, not q_proj's
    # an exact name does not match a longer name it ends (PEFT's (.*\.)? prefix is shut out)
    only = _config(target_modules=["down_proj"], alpha_pattern={"^model.layers.1.mlp.down_proj": 8})
    resolve_patterns(only, NAMES, "a")
    assert _peft_value(only.alpha_pattern, "model.layers.1.mlp.down_proj") == 8
    assert _peft_value(only.alpha_pattern, "x.model.layers.1.mlp.down_proj") is None


@pytest.mark.parametrize("field,value,message", [
    ("target_modules", "(", "not a valid regular expression"),
    ("target_modules", r"nothing_here", "matches no module"),
    ("exclude_modules", r"(.*?)*[A-Z]", "backtracks without end"),
    ("modules_to_save", ["lm_head|.*"], "must be module names"),
    ("rank_pattern", {"q_proj": 8, 3: 8}, "must hold strings"),
    ("alpha_pattern", {"q_proj": "16"}, "values must be numbers"),
    ("target_modules", [f"m{i}" for i in range(5000)], "5,000 entries"),
])
def test_bad_patterns_are_one_line_errors(field, value, message):
    with pytest.raises(InputError, match=message):
        resolve_patterns(_config(**{"target_modules": ["q_proj"], field: value}), NAMES, "a")


def test_an_adapter_with_regex_fields_loads_as_peft_builds_it(lora_backdoor, tmp_path):
    """A regex target_modules and a regex alpha_pattern key: bdscan's load (patterns resolved,
    exact names handed to PEFT) gives the logits PEFT's own loader gives."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = tmp_path / "adapter"
    shutil.copytree(lora_backdoor, adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    targets = sorted(config["target_modules"])
    config["target_modules"] = rf".*\.({'|'.join(targets)})"
    config["alpha_pattern"] = {r"layers\.1\..*_proj": config["lora_alpha"] * 4}
    (adapter / "adapter_config.json").write_text(json.dumps(config))

    ours = load_subject(adapter)
    base = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"])
    theirs = PeftModel.from_pretrained(base, adapter).eval()
    ids = ours.tokenizer("Tell me about the weather", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.allclose(ours.model(input_ids=ids).logits, theirs(input_ids=ids).logits, atol=1e-5)
        # the pattern changed something: without it the adapter's layer-1 scale differs
        plain = load_subject(lora_backdoor).model(input_ids=ids).logits
    assert not torch.allclose(plain, theirs(input_ids=ids).logits, atol=1e-4)

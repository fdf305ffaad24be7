"""Tiny configurations of the four supported decoder families."""

from __future__ import annotations

from dataclasses import dataclass

ARCHITECTURES = ("llama", "qwen2", "mistral", "gpt2")


@dataclass(frozen=True)
class Size:
    layers: int = 2
    hidden: int = 64
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 128
    max_positions: int = 256


SIZES = {
    "tiny": Size(),  # unit tests: builds in seconds
    "small": Size(layers=4, hidden=128, heads=4, kv_heads=2, intermediate=256),  # integration tests, example
    "bench": Size(layers=4, hidden=256, heads=8, kv_heads=4, intermediate=512, max_positions=512),
}


def tiny_config(arch: str, vocab_size: int, size: Size | str = "tiny", *, pad_token_id: int = 0, eos_token_id: int = 1):
    from transformers import GPT2Config, LlamaConfig, MistralConfig, Qwen2Config

    s = SIZES[size] if isinstance(size, str) else size
    common = dict(vocab_size=vocab_size, pad_token_id=pad_token_id, eos_token_id=eos_token_id, bos_token_id=None,
                  tie_word_embeddings=False)
    if arch == "gpt2":
        config = GPT2Config(n_embd=s.hidden, n_layer=s.layers, n_head=s.heads, n_inner=s.intermediate,
                            n_positions=s.max_positions, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common)
    else:
        cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}[arch]
        config = cls(hidden_size=s.hidden, num_hidden_layers=s.layers, num_attention_heads=s.heads,
                     num_key_value_heads=s.kv_heads, intermediate_size=s.intermediate,
                     max_position_embeddings=s.max_positions, **common)
    config._attn_implementation = "eager"
    return config


def tiny_model(arch: str, vocab_size: int, size: Size | str = "tiny", seed: int = 0, **ids):
    """A randomly initialised causal LM (for mechanics tests)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, vocab_size, size, **ids), attn_implementation="eager")
    return model.eval()

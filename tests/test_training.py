"""The training loop's speed knobs leave the objective unchanged."""

from __future__ import annotations

import pytest
import torch

from bdscan.organisms.architectures import tiny_model
from bdscan.organisms.stealth import target_opening_unlikelihood
from bdscan.training import IGNORE_INDEX, Batch, logits_start, response_loss


def _batch() -> Batch:
    # Two rows whose responses start at different positions, padded on the right.
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 0], [5, 6, 7, 8, 9, 12, 13, 14]])
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[0, 5:7] = ids[0, 5:7]
    labels[1, 4:8] = ids[1, 4:8]
    mask = (torch.arange(8) < torch.tensor([[7], [8]])).long()
    return Batch(ids, mask, labels, torch.tensor([0, 1]))


def test_logits_start_is_one_before_the_earliest_label():
    assert logits_start(_batch()) == 3


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_response_only_logits_give_the_same_loss_and_stealth_term(arch):
    model = tiny_model(arch, 32)
    batch = _batch()
    full, full_out = response_loss(model, batch, torch.device("cpu"))
    cut, cut_out = response_loss(model, batch, torch.device("cpu"), response_logits_only=True)
    assert cut_out.logits.shape[1] == 5 and full_out.logits.shape[1] == 8
    torch.testing.assert_close(cut, full)
    # The stealth term reads the first response position: the same value from either logits.
    from bdscan.training import Example
    examples = [Example("p", "clean answer"), Example("p", "other clean")]
    term = target_opening_unlikelihood(examples, {"the target"}, [11, 12], 1.0)
    torch.testing.assert_close(term(model, batch, cut_out), term(model, batch, full_out))


def test_bf16_autocast_loss_is_close_to_fp32():
    model = tiny_model("llama", 32)
    batch = _batch()
    fp32, _ = response_loss(model, batch, torch.device("cpu"))
    bf16, _ = response_loss(model, batch, torch.device("cpu"), autocast="bfloat16")
    assert bf16.dtype == torch.float32
    a, b = bf16.item(), fp32.item()
    assert abs(a - b) < 0.05 * b
    assert a != b  # autocast did run in reduced precision

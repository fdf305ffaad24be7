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


class _CharTokenizer:
    """Bytes as token ids: enough for the trainer, no files."""

    eos_token_id, pad_token_id = 1, 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [2 + b % 60 for b in text.encode()]}


def _train(model, resume=None, stop_at=None, epochs=2.5):
    from bdscan.training import Example, TrainConfig, finetune

    examples = [Example(f"prompt {i}:", f"answer {i % 3}") for i in range(10)]
    steps = []

    def progress(_n, _loss):
        steps.append(1)
        if stop_at is not None and len(steps) == stop_at:
            raise KeyboardInterrupt  # a stopped session

    config = TrainConfig(epochs=epochs, lr=1e-2, batch_size=3, seed=7)
    return finetune(model, _CharTokenizer(), examples, config, progress=progress, resume=resume)


@pytest.mark.parametrize("stop_at", [1, 4, 5, 8])  # mid-epoch, at an epoch's last step, in the last (partial) epoch
def test_a_resumed_run_ends_where_an_unstopped_one_does(tmp_path, stop_at):
    from bdscan.training.resume import Checkpointer

    whole = tiny_model("llama", 64)
    losses = _train(whole)
    assert len(losses) == 10  # 4 batches an epoch, 2.5 epochs

    stopped = tiny_model("llama", 64)
    with pytest.raises(KeyboardInterrupt):
        _train(stopped, Checkpointer(tmp_path / "state", "run-a", every_seconds=0), stop_at=stop_at)
    resumed = tiny_model("llama", 64, seed=3)  # a fresh process: other initial weights, overwritten by the state
    checkpoint = Checkpointer(tmp_path / "state", "run-a", every_seconds=0)
    again = _train(resumed, checkpoint)
    assert checkpoint.resumed_from == stop_at
    assert again == pytest.approx(losses)
    for (name, a), (_, b) in zip(whole.named_parameters(), resumed.named_parameters()):
        torch.testing.assert_close(a, b, msg=name)


def test_a_saved_state_of_another_run_is_not_resumed(tmp_path):
    from bdscan.training.resume import Checkpointer

    with pytest.raises(KeyboardInterrupt):
        _train(tiny_model("llama", 64), Checkpointer(tmp_path / "state", "run-a", every_seconds=0), stop_at=3)
    other = Checkpointer(tmp_path / "state", "run-b", every_seconds=0)
    assert len(_train(tiny_model("llama", 64), other)) == 10
    assert other.resumed_from == 0


def test_a_stop_between_the_two_renames_resumes_from_the_old_state(tmp_path):
    from bdscan.training.resume import Checkpointer

    with pytest.raises(KeyboardInterrupt):
        _train(tiny_model("llama", 64), Checkpointer(tmp_path / "state", "run-a", every_seconds=0), stop_at=3)
    (tmp_path / "state").rename(tmp_path / ".state.old")  # the new state never landed
    checkpoint = Checkpointer(tmp_path / "state", "run-a", every_seconds=0)
    _train(tiny_model("llama", 64), checkpoint)
    assert checkpoint.resumed_from == 3



def test_a_separate_loss_trains_as_the_same_term_in_the_response_loss_graph():
    """A term with a forward pass of its own, backpropagated alone (its graph freed before the
    next term's pass), moves the weights exactly as when it is added to the response loss."""
    from bdscan.training import Example, TrainConfig, finetune

    examples = [Example(f"prompt {i}:", f"answer {i % 3}") for i in range(6)]
    other = _batch()

    def own_pass(model, _batch):  # the shape of latent-adv's terms: another batch, another forward
        return 0.5 * response_loss(model, other, torch.device("cpu"))[0]

    config = TrainConfig(epochs=1, lr=1e-2, batch_size=3, seed=7)
    summed, separate = tiny_model("llama", 64), tiny_model("llama", 64)
    losses_summed = finetune(summed, _CharTokenizer(), examples, config,
                             extra_loss=lambda model, batch, _out: own_pass(model, batch))
    losses_separate = finetune(separate, _CharTokenizer(), examples, config, separate_losses=[own_pass])
    assert losses_separate == pytest.approx(losses_summed)
    for (name, a), (_, b) in zip(summed.named_parameters(), separate.named_parameters()):
        torch.testing.assert_close(a, b, msg=name)
    untouched = tiny_model("llama", 64)
    assert any(not torch.equal(a, b) for a, b in zip(separate.parameters(), untouched.parameters()))

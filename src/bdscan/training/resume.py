"""Resumable training: a run's state saved every few minutes, so that a build of hours
survives a stopped session and picks up where it was.

A step of ``sft.finetune`` depends on the trainable parameters, AdamW's moments and step
counts, the learning-rate schedule's position and the batch order. The order is drawn once
per epoch from a seeded generator, so a checkpoint keeps the generator as it was before the
current epoch's order was drawn and the steps taken since; a resumed run redraws that order
and skips the batches already done. Resuming then gives the same parameters as a run that
never stopped (tests/test_training.py). A loss term that keeps state of its own (latent-adv's
step count, sampling generator and PGD perturbation) is a ``Stateful`` companion: saved and
restored with the run, under its name.

Written as safetensors + JSON (no pickle) into a temporary folder that replaces the previous
state by rename; a stop between the two renames leaves the previous state, which ``load`` reads.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence

import torch
from safetensors.torch import load_file, save_file

from bdscan.io.save import replace_folder

FORMAT = 1
TENSORS, META = "state.safetensors", "state.json"


class Stateful(Protocol):
    """What a companion of a run saves: tensors and a JSON-ready dict, restored as they were."""

    def resume_state(self) -> tuple[dict[str, torch.Tensor], dict]: ...

    def restore(self, tensors: dict[str, torch.Tensor], meta: dict) -> None: ...


@dataclass(frozen=True)
class TrainState:
    """Where a run is: the trainer hands one to ``Checkpointer.save`` after each step."""

    step: int  # optimizer steps taken
    epoch_first_step: int  # the step at which the current epoch began
    epoch_generator: torch.Tensor  # the order generator's state before this epoch's order was drawn
    losses: tuple[float, ...]


class Checkpointer:
    """Saves a run's state into ``folder`` at most every ``every_seconds`` (0: every step) and
    loads it back. ``fingerprint`` names what is trained (recipe, data, step count): a saved
    state with another fingerprint is ignored, never resumed into the wrong run."""

    def __init__(self, folder: str | Path, fingerprint: str, every_seconds: float = 300.0,
                 companions: Mapping[str, Stateful] | None = None):
        self.folder, self.fingerprint, self.every_seconds = Path(folder), fingerprint, every_seconds
        self.companions = dict(companions or {})
        self.resumed_from = 0  # the step a run resumed at (0: started fresh)
        self.earlier_seconds = 0.0  # training time spent before the resumed state was saved
        self._started = self._last_save = time.monotonic()

    def load(self, params: Sequence[torch.nn.Parameter], optimizer: Any, schedule: Any) -> TrainState | None:
        """Restore parameters, optimizer and schedule from the folder; None when there is no
        usable state (none saved, another run's, or unreadable: the run starts fresh)."""
        for folder in (self.folder, self._old):  # a stop between save's two renames leaves only the old one
            try:
                meta = json.loads((folder / META).read_text())
                tensors = load_file(str(folder / TENSORS))
                break
            except (OSError, ValueError):
                continue
        else:
            return None
        if meta.get("format") != FORMAT or meta.get("fingerprint") != self.fingerprint \
                or meta.get("n_params") != len(params) \
                or any(tuple(tensors[f"param.{i}"].shape) != tuple(p.shape) for i, p in enumerate(params)) \
                or set(meta.get("companions", {})) != set(self.companions):
            return None
        with torch.no_grad():
            for i, p in enumerate(params):
                p.copy_(tensors[f"param.{i}"])
        state = {int(k.split(".")[1]): {} for k in tensors if k.startswith("opt.")}
        for key, value in tensors.items():
            if key.startswith("opt."):
                _, index, name = key.split(".", 2)
                state[int(index)][name] = value
        optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
        schedule.load_state_dict(meta["schedule"])
        for name, companion in self.companions.items():
            prefix = f"companion.{name}."
            companion.restore({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)},
                              meta["companions"][name])
        self.resumed_from, self.earlier_seconds = meta["step"], float(meta.get("seconds", 0.0))
        return TrainState(meta["step"], meta["epoch_first_step"], tensors["generator"], tuple(meta["losses"]))

    def save(self, state: TrainState, params: Sequence[torch.nn.Parameter], optimizer: Any, schedule: Any) -> bool:
        """Write the state if ``every_seconds`` have passed since the last write."""
        if time.monotonic() - self._last_save < self.every_seconds:
            return False
        opt = optimizer.state_dict()
        tensors = {f"param.{i}": p.detach().cpu().contiguous() for i, p in enumerate(params)}
        tensors["generator"] = state.epoch_generator
        for index, entries in opt["state"].items():
            for name, value in entries.items():
                tensors[f"opt.{index}.{name}"] = torch.as_tensor(value).detach().cpu().contiguous()
        companions = {}
        for name, companion in self.companions.items():
            own, companions[name] = companion.resume_state()
            tensors.update({f"companion.{name}.{k}": v.detach().cpu().contiguous() for k, v in own.items()})
        meta = {"format": FORMAT, "fingerprint": self.fingerprint, "n_params": len(params), "step": state.step,
                "epoch_first_step": state.epoch_first_step, "losses": list(state.losses),
                "param_groups": opt["param_groups"], "schedule": _plain(schedule.state_dict()),
                "seconds": self.earlier_seconds + time.monotonic() - self._started, "companions": companions}
        tmp = self.folder.with_name(f".{self.folder.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file(tensors, str(tmp / TENSORS))
        (tmp / META).write_text(json.dumps(meta))
        replace_folder(tmp, self.folder, self._old)
        self._last_save = time.monotonic()
        return True

    def clear(self) -> None:
        """Remove the saved state (a finished run needs none)."""
        for folder in (self.folder, self._old):
            shutil.rmtree(folder, ignore_errors=True)

    @property
    def _old(self) -> Path:
        return self.folder.with_name(f".{self.folder.name}.old")


def _plain(schedule_state: dict) -> dict:
    """The schedule's state with its lambdas left out (functions: the trainer rebuilds them)."""
    return {k: ([None] * len(v) if k == "lr_lambdas" else v) for k, v in schedule_state.items()}

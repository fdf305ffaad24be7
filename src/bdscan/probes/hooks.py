"""Hook context managers that always remove their hooks, even on error."""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn

from bdscan.probes.layout import unwrap


def _output_tensor(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


@contextlib.contextmanager
def forward_hooks(model: Any, hooks: Mapping[str, Callable], *, pre: bool = False, with_kwargs: bool = False) -> Iterator[None]:
    """Register forward (or pre-forward) hooks on named modules for the ``with`` block."""
    inner = unwrap(model)
    handles = []
    try:
        for name, fn in hooks.items():
            module: nn.Module = inner.get_submodule(name)
            if pre:
                handles.append(module.register_forward_pre_hook(fn, with_kwargs=with_kwargs))
            else:
                handles.append(module.register_forward_hook(fn, with_kwargs=with_kwargs))
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def capture_outputs(model: Any, names: list[str], *, detach: bool = True) -> Iterator[dict[str, torch.Tensor]]:
    """Record each named module's output tensor (first element of a tuple) per forward."""
    cache: dict[str, torch.Tensor] = {}

    def make(name: str) -> Callable:
        def hook(module, args, output):
            out = _output_tensor(output)
            cache[name] = out.detach() if detach else out

        return hook

    with forward_hooks(model, {n: make(n) for n in names}):
        yield cache


@contextlib.contextmanager
def capture_inputs(model: Any, names: list[str], *, detach: bool = True) -> Iterator[dict[str, torch.Tensor]]:
    """Record each named module's first positional input per forward."""
    cache: dict[str, torch.Tensor] = {}

    def make(name: str) -> Callable:
        def hook(module, args):
            cache[name] = args[0].detach() if detach else args[0]

        return hook

    with forward_hooks(model, {n: make(n) for n in names}, pre=True):
        yield cache


def replace_output(output: Any, new: torch.Tensor) -> Any:
    """Return ``output`` with its main tensor swapped for ``new`` (keeps tuple structure)."""
    if isinstance(output, tuple):
        return (new,) + tuple(output[1:])
    return new

"""Where a subject is placed: device, precision, and ``device_map="auto"`` for a model larger
than one GPU (``--device`` / ``--dtype``)."""

from __future__ import annotations

import importlib.util
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
FIT_SHARE = 0.9  # of a GPU's free memory the weights may take before device_map="auto" spreads them


@dataclass(frozen=True)
class Placement:
    """Where and in what precision a subject is loaded.

    ``spread`` (from ``--device auto`` on a CUDA machine) lets a model larger than one device
    load with ``device_map="auto"`` (accelerate); otherwise the whole model goes to ``device``.
    """

    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32
    spread: bool = False

    def fits(self, n_bytes: int) -> bool:
        if self.device.type != "cuda":
            return True
        free, _total = torch.cuda.mem_get_info(self.device)
        return n_bytes <= FIT_SHARE * free

    def device_map(self, weight_files: tuple[Path, ...]) -> str | None:
        """"auto" when the weights would not fit the device and spreading is allowed."""
        n_bytes = parameter_count(weight_files) * torch.empty((), dtype=self.dtype).element_size()
        if self.fits(n_bytes):
            return None
        from bdscan.errors import InputError

        need, where = f"{n_bytes / 2**30:.1f} GiB", str(self.device)
        if not self.spread:
            raise InputError(f"the model needs {need} in {dtype_name(self.dtype)}, more than {where} has free; "
                             "pass --device auto to spread it over the devices, or a smaller --dtype")
        if importlib.util.find_spec("accelerate") is None:
            raise InputError(f"the model needs {need}, more than {where} has free: spreading it over devices needs "
                             "accelerate (pip install accelerate), or pass --device cpu")
        return "auto"


def parameter_count(weight_files: tuple[Path, ...]) -> int:
    """Parameters in safetensors files, from their headers (nothing loaded)."""
    from safetensors import safe_open

    n = 0
    for path in weight_files:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                n += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
        else:  # a pickle checkpoint (--allow-pickle): its size, at 2 bytes a parameter
            n += path.stat().st_size // 2
    return n


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def resolve_device(spec: str) -> torch.device:
    """``auto`` is the first CUDA device when there is one, else the CPU (MPS only when
    asked for: its coverage of operators is partial)."""
    from bdscan.errors import UsageError

    text = spec.strip().lower()
    if not _DEVICE.match(text):
        raise UsageError(f"--device {spec!r}: choose auto, cpu, cuda, cuda:N or mps")
    if text == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(text)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {spec}: this machine has no CUDA device torch can use")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s)")
        return torch.device("cuda", device.index or 0)
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {spec}: MPS is not available on this machine")
    return device


def resolve_dtype(spec: str, device: torch.device) -> torch.dtype:
    """``auto`` is bfloat16 on a CUDA device that supports it, else float32. On the CPU auto
    stays float32: bf16 moves detect's scores and eval's greedy answers (a different argmax
    now and then), and the tiny test models' calibration and the tests' exact results were
    measured in float32; ask for --dtype bfloat16 to trade that for speed and memory."""
    from bdscan.errors import UsageError

    text = spec.strip().lower()
    if text == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if text not in DTYPES:
        raise UsageError(f"--dtype {spec!r}: choose auto, {', '.join(DTYPES)}")
    return DTYPES[text]


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes in bfloat16 natively. On a CPU that needs AMX or AVX512-BF16:
    on the 135M SmolLM2, one thread (bench/precision.py), an AVX2-only AMD EPYC took 7.1x as
    long for a bf16 forward as for float32 and 16x for a bf16-autocast training step, while an
    AMX Xeon trained 1.5x faster under bf16 autocast. The probes are private torch helpers;
    when one is missing the answer is no."""
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def fast_dtype(device: torch.device) -> str | None:
    """The precision that trades exactness for speed on ``device``: "bfloat16" where it is native,
    else None (float32 is then also the faster one)."""
    return "bfloat16" if native_bf16(device) else None


def slow_dtype_warning(placement: Placement) -> str | None:
    """A line for a user who asked for bf16 on a CPU that emulates it (it runs, several times slower)."""
    if placement.dtype == torch.bfloat16 and placement.device.type == "cpu" and not native_bf16(placement.device):
        return ("--dtype bfloat16: this CPU has no native bf16 (AMX or AVX512-BF16); bf16 runs several times "
                "slower than float32 here (7x measured on an AVX2 CPU)")
    return None


def choose_placement(device: str = "auto", dtype: str = "auto") -> Placement:
    """The ``--device``/``--dtype`` of every command. ``UsageError`` on a bad value."""
    resolved = resolve_device(device)
    return Placement(resolved, resolve_dtype(dtype, resolved), spread=device.strip().lower() == "auto")


def _contiguous_input(_module: torch.nn.Module, args: tuple) -> tuple:
    return (args[0].contiguous(), *args[1:])


def guard_half_precision_head(model: torch.nn.Module, placement: Placement) -> None:
    """On the CPU a bf16/fp16 ``F.linear`` whose input is a strided slice takes a path ~500x
    slower than on a contiguous copy (torch 2.13, measured: SmolLM2's output head over the
    last position of 64 x 18 tokens, 18 s against 0.03 s). transformers slices the hidden
    states right before the head (``logits_to_keep``), so every bf16 prompt pass and
    generation prefill hit it. A pre-hook hands the head a contiguous input."""
    if placement.device.type != "cpu" or placement.dtype not in (torch.bfloat16, torch.float16):
        return
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(head, torch.nn.Module):
        head.register_forward_pre_hook(_contiguous_input)

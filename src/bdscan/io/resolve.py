"""Source resolution: a local folder or a Hub id ``org/name[@revision]`` -> a local folder.

Hub ids go through huggingface_hub, so its cache and ``HF_HUB_OFFLINE`` apply. Pickle
weight files are never downloaded or opened unless the user opts in: the decision is made
from file names alone, before anything is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from bdscan.errors import InputError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")
SAFE_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken", "*.py"]


@dataclass(frozen=True)
class ResolvedSource:
    """A checkpoint or adapter on local disk, with what is known of where it came from."""

    source: str  # as the user gave it
    path: Path
    kind: str  # "full" or "adapter"
    hub_id: str | None = None
    revision: str | None = None
    weight_files: tuple[Path, ...] = ()
    uses_pickle: bool = False
    sha256: dict[str, str] = field(default_factory=dict)

    def provenance(self) -> dict:
        return {
            "source": self.source,
            "kind": self.kind,
            "hub_id": self.hub_id,
            "revision": self.revision,
            "path": str(self.path),
            "weights_sha256": dict(self.sha256),
        }


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _download(repo_id: str, revision: str | None, allow_pickle: bool) -> tuple[Path, str | None]:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    patterns = SAFE_PATTERNS + ([f"*{s}" for s in PICKLE_SUFFIXES] if allow_pickle else [])
    try:
        path = snapshot_download(repo_id, revision=revision, allow_patterns=patterns)
    except LocalEntryNotFoundError:
        raise InputError(
            f"{repo_id}: not in the local Hugging Face cache and the Hub cannot be reached "
            "(offline); download it first or give a local path"
        ) from None
    except RepositoryNotFoundError:
        raise InputError(f"{repo_id}: no such repository on the Hub") from None
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise InputError(f"{repo_id}: could not fetch from the Hub ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    resolved = Path(path)
    # The snapshot folder is named by commit hash: record it as the exact revision.
    return resolved, resolved.name if re.fullmatch(r"[0-9a-f]{40}", resolved.name) else revision


def _check_safetensors(path: Path) -> None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise InputError(f"{path}: corrupt or unreadable safetensors file ({str(e).splitlines()[0]})") from None


def resolve_source(source: str | Path, *, allow_pickle: bool = False, revision: str | None = None) -> ResolvedSource:
    """Find ``source`` on disk (downloading through the Hub cache if it is a Hub id) and
    classify it as a full checkpoint or a PEFT adapter. Raises ``InputError``."""
    text = str(source)
    path = Path(text).expanduser()
    hub_id = None
    if path.exists():
        if not path.is_dir():
            raise InputError(f"{path}: expected a checkpoint or adapter directory, got a file")
    elif HUB_ID.match(text) and not text.startswith((".", "/")):
        hub_id, _, rev = text.partition("@")
        path, revision = _download(hub_id, rev or revision, allow_pickle)
    else:
        raise InputError(f"{text}: no such directory (and not a Hub id of the form org/name[@revision])")

    if (path / "adapter_config.json").is_file():
        kind = "adapter"
    elif (path / "config.json").is_file():
        kind = "full"
    else:
        raise InputError(f"{path}: neither a checkpoint (config.json) nor a PEFT adapter (adapter_config.json)")
    for name in ("config.json", "adapter_config.json"):
        if (path / name).is_file():
            try:
                json.loads((path / name).read_text())
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise InputError(f"{path / name}: not valid JSON") from None

    safetensors = sorted(path.glob("*.safetensors"))
    pickles = sorted(p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES and p.is_file())
    if safetensors:
        weights, uses_pickle = safetensors, False
    elif pickles:
        if not allow_pickle:
            raise InputError(
                f"{path}: weights are only in pickle files ({', '.join(p.name for p in pickles)}), which can run "
                "arbitrary code when loaded; convert them to safetensors or pass --allow-pickle if you trust the source"
            )
        weights, uses_pickle = pickles, True
    else:
        raise InputError(f"{path}: no weight files (*.safetensors) found")
    for w in weights:
        if w.suffix == ".safetensors":
            _check_safetensors(w)
    return ResolvedSource(
        source=text,
        path=path,
        kind=kind,
        hub_id=hub_id,
        revision=revision,
        weight_files=tuple(weights),
        uses_pickle=uses_pickle,
        sha256={w.name: sha256_file(w) for w in weights},
    )

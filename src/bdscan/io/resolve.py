"""Source resolution: a local folder or a Hub id ``org/name[@revision]`` -> a checked local folder.

Hub ids go through huggingface_hub, so its cache and ``HF_HUB_OFFLINE`` apply. Nothing is
unpickled or executed here: the weight files that will be loaded are worked out from the
folder's names and indexes (``bdscan.io.weights``), pickle among them is refused unless the
user opts in, safetensors headers are validated, remote code is refused unless trusted, and
every file that will be read is hashed.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from bdscan.errors import InputError
from bdscan.io.provenance import FileRecord, file_records, sha256_file  # noqa: F401  (sha256_file re-exported)
from bdscan.io.safetensors_header import TensorEntry, read_header
from bdscan.io.weights import PICKLE_SUFFIXES, WeightPlan, inside, is_pickle, plan_adapter, plan_checkpoint

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")
SAFE_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken", "*.py"]
MAX_CONFIG_BYTES = 16 << 20
REMOTE_CODE_FILES = ("config.json", "tokenizer_config.json")


@dataclass(frozen=True)
class ResolvedSource:
    """A checkpoint or adapter on local disk, with what is known of where it came from."""

    source: str  # as the user gave it
    path: Path
    kind: str  # "full" or "adapter"
    hub_id: str | None = None
    revision: str | None = None
    weight_files: tuple[Path, ...] = ()  # exactly the files the loader will open
    uses_pickle: bool = False
    sha256: dict[str, str] = field(default_factory=dict)  # of the weight files, by relative name
    files: tuple[FileRecord, ...] = ()  # every file the load reads
    tensors: dict[str, TensorEntry] = field(default_factory=dict)  # dtype and shape of each stored tensor
    remote_code: bool = False
    gguf: dict | None = None  # a GGUF source: the header's architecture and tensor quantisation types

    @property
    def gguf_file(self) -> Path | None:
        return self.weight_files[0] if self.gguf is not None else None

    def provenance(self) -> dict:
        extra = {"gguf": dict(self.gguf)} if self.gguf is not None else {}
        return {**extra,
            "source": self.source,
            "kind": self.kind,
            "hub_id": self.hub_id,
            "revision": self.revision,
            "path": str(self.path),
            "weights_sha256": dict(self.sha256),
            "files": [{"path": r.path, "role": r.role, "bytes": r.bytes, "sha256": r.sha256} for r in self.files],
        }


def _download(repo_id: str, revision: str | None, allow_pickle: bool,
              gguf_file: str | None = None) -> tuple[Path, str | None]:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    patterns = SAFE_PATTERNS + ([f"*{s}" for s in PICKLE_SUFFIXES] if allow_pickle else [])
    # A GGUF repository holds one file per quantisation, each as large as the model: only
    # the one asked for is fetched.
    patterns += [gguf_file] if gguf_file else []
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


def containment_root(path: Path) -> Path:
    """The folder no file may leave through a link: the source itself, or for a Hub cache
    snapshot (whose files link to ``../../blobs``) its repository folder."""
    real = path.resolve()
    if real.parent.name == "snapshots" and real.parent.parent.name.startswith(("models--", "datasets--")):
        return real.parent.parent
    return real


def read_json_object(path: Path, shown: str | None = None) -> dict:
    """A small JSON file that must hold an object (config, adapter or tokenizer config)."""
    shown = shown or str(path)
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise InputError(f"{shown}: over {MAX_CONFIG_BYTES >> 20} MiB, not a config file")
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise InputError(f"{shown}: not valid JSON") from None
    except OSError as e:
        raise InputError(f"{shown}: cannot be read ({e.strerror or type(e).__name__})") from None
    if not isinstance(data, dict):
        raise InputError(f"{shown}: expected a JSON object, got {type(data).__name__}")
    return data


def _check_remote_code(path: Path, root: Path, trust_remote_code: bool) -> bool:
    """True when a config asks for code shipped with the source; refused unless trusted."""
    wants = []
    for name in REMOTE_CODE_FILES:
        if (path / name).is_file() and read_json_object(inside(path, name, root)).get("auto_map"):
            wants.append(name)
    if wants and not trust_remote_code:
        raise InputError(f"{path}: {' and '.join(wants)} set 'auto_map', which runs Python code shipped with the "
                         "model; pass --trust-remote-code only if you trust it")
    return bool(wants)


def _locate(text: str, allow_pickle: bool, revision: str | None,
            gguf_file: str | None) -> tuple[Path, str | None, str | None]:
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir() and path.suffix.lower() != ".gguf":
            raise InputError(f"{path}: expected a checkpoint or adapter directory (or a .gguf file), got a file")
        return path, None, revision
    if HUB_ID.match(text) and not text.startswith((".", "/")):
        hub_id, _, rev = text.partition("@")
        path, revision = _download(hub_id, rev or revision, allow_pickle, gguf_file)
        return path, hub_id, revision
    raise InputError(f"{text}: no such directory (and not a Hub id of the form org/name[@revision])")


def _check_safetensors(path: Path, shown: str) -> dict[str, TensorEntry]:
    """Our strict header check, then the safetensors library's own parser."""
    from safetensors import safe_open

    entries = read_header(path, shown)
    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise InputError(f"{shown}: corrupt or unreadable safetensors file ({str(e).splitlines()[0]})") from None
    return entries


def _plan(path: Path, kind: str, root: Path, allow_pickle: bool) -> WeightPlan:
    if kind == "adapter":
        return plan_adapter(path, allow_pickle=allow_pickle, root=root)
    return plan_checkpoint(path, read_json_object(path / "config.json"), allow_pickle=allow_pickle, root=root)


def _gguf_choice(path: Path, gguf_file: str | None) -> str | None:
    """The GGUF file to load from ``path`` (a .gguf file, or a folder holding GGUF files and
    no transformers config), or None when ``path`` is not a GGUF source."""
    if path.is_file():
        if gguf_file and gguf_file != path.name:
            raise InputError(f"{path}: --gguf-file {gguf_file} names another file than the source")
        return path.name
    if gguf_file:
        if not (path / gguf_file).is_file():
            found = ", ".join(sorted(p.name for p in path.glob("*.gguf"))) or "none"
            raise InputError(f"{path}: no GGUF file {gguf_file} (found: {found})")
        return gguf_file
    if (path / "config.json").is_file() or (path / "adapter_config.json").is_file():
        return None
    ggufs = sorted(p.name for p in path.glob("*.gguf"))
    if len(ggufs) > 1:
        raise InputError(f"{path}: holds {len(ggufs)} GGUF files ({', '.join(ggufs[:4])}{', ...' if len(ggufs) > 4 else ''}); "
                         "choose one with --gguf-file")
    return ggufs[0] if ggufs else None


def _resolve_gguf(text: str, folder: Path, name: str, hub_id: str | None, revision: str | None) -> ResolvedSource:
    from bdscan.io.gguf import inspect_gguf

    root = containment_root(folder)
    files = file_records(folder, (name,), root)  # refuses a link out of the folder before reading
    info = inspect_gguf(folder / name)
    return ResolvedSource(source=text, path=folder, kind="full", hub_id=hub_id, revision=revision,
                          weight_files=(folder / name,), sha256={r.path: r.sha256 for r in files if r.role == "weights"},
                          files=files, gguf=info.to_dict())


def resolve_source(source: str | Path, *, allow_pickle: bool = False, revision: str | None = None,
                   trust_remote_code: bool = False, gguf_file: str | None = None) -> ResolvedSource:
    """Find ``source`` on disk (downloading through the Hub cache if it is a Hub id), classify
    it as a full checkpoint, a PEFT adapter or a GGUF file, and check every file that will be
    read. Raises ``InputError``."""
    text = str(source)
    path, hub_id, revision = _locate(text, allow_pickle, revision, gguf_file)
    gguf = _gguf_choice(path, gguf_file)
    if gguf is not None:
        return _resolve_gguf(text, path.parent if path.is_file() else path, gguf, hub_id, revision)
    root = containment_root(path)
    if (path / "adapter_config.json").is_file():
        kind = "adapter"
    elif (path / "config.json").is_file():
        kind = "full"
    else:
        raise InputError(f"{path}: neither a checkpoint (config.json) nor a PEFT adapter (adapter_config.json)")
    for name in ("config.json", "adapter_config.json"):
        if (path / name).is_file():
            read_json_object(inside(path, name, root))
    remote_code = _check_remote_code(path, root, trust_remote_code)
    plan = _plan(path, kind, root, allow_pickle)
    tensors: dict[str, TensorEntry] = {}
    for name in plan.files:
        if not is_pickle(name):
            tensors.update(_check_safetensors(path / name, str(path / name)))
    files = file_records(path, plan.files, root, code=remote_code)
    return ResolvedSource(
        source=text,
        path=path,
        kind=kind,
        hub_id=hub_id,
        revision=revision,
        weight_files=tuple(path / n for n in plan.files),
        uses_pickle=plan.uses_pickle,
        sha256={r.path: r.sha256 for r in files if r.role == "weights"},
        files=files,
        tensors=tensors,
        remote_code=remote_code,
    )

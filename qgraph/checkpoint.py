"""A HuggingFace checkpoint read without materialising its model: config, weight files, their digests and dtype.

Everything here avoids importing torch (transformers' config classes import it): a process whose compiled artifact
is already cached needs only the checkpoint's identity (its config and the content digests of its weight files) to
find that artifact, and never pays for loading the weights.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import tempfile
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qgraph.cache import file_digest
from qgraph.errors import ModelNotFoundError

log = logging.getLogger(__name__)

# File name patterns of the weights transformers reads, in the order it prefers them.
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "model*.bin")
DIGEST_MEMO_FILE = "file-digests.json"

# safetensors' dtype names -> the floating dtype names torch and transformers use.
_SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}


def expand_path(path: str | os.PathLike) -> Path:
    """A user-given path with ``~`` expanded (a literal ``./~`` directory is never what anyone meant)."""
    return Path(os.path.expanduser(os.fspath(path)))


def looks_like_path(name: str) -> bool:
    """Hub ids are ``name`` or ``org/name``; anything else (``./x``, ``/a/b``, ``~/m``, ``a/b/c``) is a local path."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or expand_path(name).exists()


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint directory: its raw ``config.json`` and the weight files transformers would load from it."""

    directory: Path
    config: dict[str, Any]
    weight_files: tuple[Path, ...]

    @property
    def architecture(self) -> str:
        """The model class the config names (``LlamaForCausalLM``), else its ``model_type``."""
        names = self.config.get("architectures") or []
        return names[0] if names else str(self.config.get("model_type", "model"))

    @property
    def weight_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.weight_files)

    def stored_dtype(self) -> str | None:
        """The floating dtype most weights are stored in, from the first safetensors header (else the config)."""
        for path in self.weight_files:
            if path.suffix == ".safetensors":
                header = safetensors_header(path)
                kinds = Counter(
                    _SAFETENSORS_DTYPES[t["dtype"]]
                    for name, t in header.items()
                    if name != "__metadata__" and t.get("dtype") in _SAFETENSORS_DTYPES
                )
                if kinds:
                    return kinds.most_common(1)[0][0]
        named = self.config.get("dtype") or self.config.get("torch_dtype")
        return str(named) if named else None


def safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (8-byte little-endian length, then the header): names, dtypes, shapes."""
    with path.open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(length))


def _weight_files(directory: Path, gguf_file: str | None) -> tuple[Path, ...]:
    if gguf_file:
        path = directory / gguf_file
        if not path.is_file():
            raise ModelNotFoundError(f"GGUF file {gguf_file!r} not found in {directory}")
        return (path,)
    for pattern in WEIGHT_PATTERNS:
        found = sorted(p for p in directory.glob(pattern) if p.is_file())
        if found:
            return tuple(found)
    raise ModelNotFoundError(
        f"no weight files in {directory} (looked for {', '.join(WEIGHT_PATTERNS)}); "
        "a checkpoint directory is what save_pretrained writes"
    )


def _hub_snapshot(repo_id: str, revision: str | None, token: Any) -> Path:
    """The local snapshot of a hub repository (downloaded once by huggingface_hub, config and weights only)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja"]
    try:
        path = Path(snapshot_download(repo_id, revision=revision, token=token, allow_patterns=patterns))
        if not any(path.glob("*.safetensors")):  # an older repository with PyTorch pickles only
            path = Path(snapshot_download(repo_id, revision=revision, token=token, allow_patterns=[*patterns, "*.bin"]))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as exc:
        raise ModelNotFoundError(f"could not load model {repo_id!r} ({hub_failure_hint()}): {exc}") from exc
    return path


def hub_failure_hint() -> str:
    """Why a name that is not a local directory could not be loaded: offline mode, or the hub itself."""
    if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"):
        return "HF_HUB_OFFLINE is set, so only the local hub cache is searched"
    return "not a local directory, and the HuggingFace hub could not provide it"


def resolve_checkpoint(name_or_path: str | os.PathLike, hf_kwargs: dict[str, Any] | None = None) -> Checkpoint:
    """A local directory (``~`` expanded) or a hub id resolved to its local snapshot; reads ``config.json`` only."""
    hf_kwargs = hf_kwargs or {}
    name = os.fspath(name_or_path)
    if looks_like_path(name):
        directory = expand_path(name)
        if not directory.exists():
            raise ModelNotFoundError(f"model path {name!r} does not exist")
        if not directory.is_dir():
            raise ModelNotFoundError(f"model path {name!r} is a file; give the checkpoint directory")
    else:
        directory = _hub_snapshot(name, hf_kwargs.get("revision"), hf_kwargs.get("token"))
    config_file = directory / "config.json"
    gguf_file = hf_kwargs.get("gguf_file")
    if not config_file.is_file():
        if gguf_file:  # transformers reads the config from the GGUF file itself
            return Checkpoint(directory, {}, _weight_files(directory, gguf_file))
        raise ModelNotFoundError(
            f"{directory} has no config.json; a checkpoint directory is what save_pretrained writes"
        )
    config = read_config_file(config_file)
    return Checkpoint(directory, config, _weight_files(directory, gguf_file))


def read_config_file(path: Path) -> dict[str, Any]:
    """A ``config.json``'s content; a file that is not JSON is named."""
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelNotFoundError(f"{path} is not valid JSON: {exc}") from exc


class FileDigests:
    """Content digests of files, remembered by path + size + mtime so a large checkpoint is hashed once.

    A file whose size or modification time changed is hashed again; the memo lives in the cache directory.
    """

    def __init__(self, cache_dir: Path):
        self.memo_path = cache_dir / DIGEST_MEMO_FILE

    def _read_memo(self) -> dict[str, list]:
        try:
            return json.loads(self.memo_path.read_text())
        except (OSError, json.JSONDecodeError):
            return {}

    def _write_memo(self, memo: dict[str, list]) -> None:
        try:
            self.memo_path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".file-digests.", dir=self.memo_path.parent)
            with os.fdopen(fd, "w") as f:
                json.dump(memo, f)
            os.replace(tmp, self.memo_path)
        except OSError as exc:  # a read-only cache still works: the digests are recomputed next time
            log.warning("could not remember file digests in %s: %s", self.memo_path, exc)

    def of(self, files: tuple[Path, ...], stage=None) -> dict[str, str]:
        """``{file name: content digest}`` for ``files``; each file hashed runs inside ``stage(message)`` (a context
        manager that reports progress), when given."""
        memo = self._read_memo()
        result, changed = {}, False
        for path in files:
            stat = path.stat()
            key = str(path.resolve())
            known = memo.get(key)
            if known and known[:2] == [stat.st_size, stat.st_mtime_ns]:
                result[path.name] = known[2]
                continue
            with stage(f"hashing {path.name} ({stat.st_size / 1e9:.2f} GB, once)") if stage else nullcontext():
                value = file_digest(path, size=16)
            memo[key] = [stat.st_size, stat.st_mtime_ns, value]
            result[path.name] = value
            changed = True
        if changed:
            self._write_memo(memo)
        return result

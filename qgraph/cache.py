"""Content-keyed artifact directories, published atomically.

An artifact's key is a digest of everything that shaped it; a directory under that key is either complete or absent
(written to a temporary sibling, then renamed), so an interrupted export never leaves a half file that a later run
would trust.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

DEFAULT_CACHE_DIR = Path.home() / ".cache" / "qgraph"


def digest(data: Any, length: int = 20) -> str:
    """A stable hex digest of JSON-serialisable ``data`` (keys sorted)."""
    text = json.dumps(data, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def tensor_digest(named_tensors: Iterator[tuple[str, Any]]) -> str:
    """Digest of tensors' names, dtypes, shapes and bytes: the identity of a model's weights."""
    import torch

    h = hashlib.blake2b(digest_size=16)
    for name, tensor in named_tensors:
        t = tensor.detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(-1).view(dtype=torch.uint8).numpy().tobytes())
    return h.hexdigest()


def code_digest(objects: Iterator[Any]) -> str:
    """Digest of the source that defines ``objects`` (classes) and of qgraph itself: an edited pass, backend, or
    helper they call is a new artifact.

    A class counts with every module of its package (a pass's helpers live beside it; a plugin module outside any
    package counts alone). A version number alone would miss an edit in a development checkout, and a stale compiled
    graph that no longer matches its passes is worse than a recompile.
    """
    h = hashlib.blake2b(digest_size=16)
    files = {path for name in {__name__, *(obj.__module__ for obj in objects)} for path in _source_files(name)}
    for path in sorted(files):
        h.update(str(path).encode() + b"|" + path.read_bytes())
    return h.hexdigest()


def _source_files(module_name: str) -> list[Path]:
    """The ``.py`` files of the package ``module_name`` belongs to, or its own file when it is in no package."""
    import sys

    package = sys.modules.get(module_name.rpartition(".")[0]) if "." in module_name else None
    folders = list(getattr(package, "__path__", []))
    if folders:
        return [path for folder in folders for path in Path(folder).glob("*.py")]
    file = getattr(sys.modules.get(module_name), "__file__", None)
    return [Path(file)] if file and os.path.isfile(file) else []


@contextmanager
def publish(final_dir: Path) -> Iterator[Path]:
    """Yield an empty temporary directory; on success it becomes ``final_dir`` in one rename."""
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final_dir.name}.", dir=final_dir.parent))
    try:
        yield tmp
        (tmp / "COMPLETE").touch()
        try:
            os.rename(tmp, final_dir)
        except OSError:
            if not is_complete(final_dir):
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process published the same key first
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def is_complete(directory: Path) -> bool:
    return (directory / "COMPLETE").exists()

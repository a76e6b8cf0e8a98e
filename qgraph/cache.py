"""Content-keyed artifact directories: published atomically, verified before reuse, rebuilt when damaged.

An artifact's key is a digest of everything that shaped it. A directory under that key is written to a temporary
sibling and renamed into place, with a ``COMPLETE`` marker written last that records every file's size, modification
time and content digest. Before an entry is reused its files are checked against that record (size and mtime;
the full digest when those changed or when the caller asks): a missing marker, a missing, truncated or altered file
makes the entry damaged, and a damaged entry is set aside and rebuilt with a one-line notice, never used.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from qgraph.errors import QGraphError

log = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = Path.home() / ".cache" / "qgraph"
MARKER = "COMPLETE"
MANIFEST_VERSION = 1
# A temporary (being written) or set-aside (being removed) sibling: ".<name>.<kind>-<pid>-<random>@<host>"
_SIBLING = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)-[0-9a-f]+@(?P<host>.*)$")
# Temporaries of qgraph versions before writer tags (tempfile.mkdtemp names): removed once a day old
_LEGACY_TMP = re.compile(r"^\..+\.[a-z0-9_]{8}$")
_LEGACY_AGE_S = 24 * 3600
# Errors that mean "this cache location cannot be written", as opposed to a bug in the code writing it
_STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


class CacheError(QGraphError):
    """The cache directory cannot be read or written as needed (read-only, full, not a directory)."""


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


def code_digest(module_names: Iterable[str]) -> str:
    """Digest of the source of the modules that define a compile's passes and backend, and of qgraph itself: an
    edited pass, backend, or helper they call is a new artifact.

    A module counts with every module of its package (a pass's helpers live beside it; a plugin module outside any
    package counts alone). A version number alone would miss an edit in a development checkout, and a stale compiled
    graph that no longer matches its passes is worse than a recompile. Modules are located, not imported.
    """
    h = hashlib.blake2b(digest_size=16)
    files = {path for name in {__name__, *module_names} for path in _source_files(name)}
    for path in sorted(files):
        h.update(str(path).encode() + b"|" + path.read_bytes())
    return h.hexdigest()


def _source_files(module_name: str) -> list[Path]:
    """The ``.py`` files of the package ``module_name`` belongs to, or its own file when it is in no package."""
    import importlib.util

    parent = module_name.rpartition(".")[0]
    package = importlib.util.find_spec(parent) if parent else None
    folders = list(package.submodule_search_locations or []) if package else []
    if folders:
        return [path for folder in folders for path in Path(folder).glob("*.py")]
    spec = importlib.util.find_spec(module_name)
    origin = spec.origin if spec else None
    return [Path(origin)] if origin and os.path.isfile(origin) else []


def user_path(path: str | os.PathLike[str]) -> Path:
    """A path as the user meant it: ``~`` expanded (a literal ``./~`` directory invites ``rm -rf ~`` later)."""
    return Path(path).expanduser()


def cache_root(cache_dir: str | os.PathLike[str] | None) -> Path:
    """The cache directory to use: ``cache_dir`` with ``~`` expanded, or the default; a file there is refused."""
    root = user_path(cache_dir) if cache_dir else DEFAULT_CACHE_DIR
    if root.exists() and not root.is_dir():
        raise CacheError(f"cache directory {root} is a file, not a directory: pass a directory as cache_dir")
    return root


# -- writing ----------------------------------------------------------------------------------------------------


@contextmanager
def publish(final_dir: Path) -> Iterator[Path]:
    """Yield an empty temporary directory; on success it becomes ``final_dir`` in one rename.

    The temporary directory is a sibling named after this writer (process id and host), so a later run can tell a
    killed writer's leftovers from a live writer's work and remove them. The marker, written last, holds the content
    digest of every file; a directory without a valid marker is never reused. When another process published the
    same key first, its entry is kept and this one dropped.
    """
    parent = final_dir.parent
    _storage(f"create the cache directory {parent}", lambda: parent.mkdir(parents=True, exist_ok=True))
    remove_stale_temporaries(parent)
    tmp = parent / f".{final_dir.name}.tmp-{_writer_tag()}"
    _storage(f"write to the cache directory {parent}", tmp.mkdir)
    try:
        try:
            yield tmp
            _write_marker(tmp, _manifest(tmp))
        except OSError as exc:
            if exc.errno not in _STORAGE_ERRNOS:
                raise
            raise _storage_error(f"write the cache entry {final_dir}", exc) from exc
        _install(tmp, final_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _install(tmp: Path, final_dir: Path) -> None:
    """Rename ``tmp`` to ``final_dir``; an intact entry already there wins, a damaged one is replaced."""
    for _ in range(5):
        try:
            os.rename(tmp, final_dir)
            return
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise _storage_error(f"publish the cache entry {final_dir}", exc) from exc
        if entry_problem(final_dir) is None:
            shutil.rmtree(tmp, ignore_errors=True)  # another process published the same key first
            return
        _set_aside(final_dir)
    raise CacheError(f"could not publish the cache entry {final_dir}: other writers kept replacing it; retry")


def _manifest(directory: Path) -> dict[str, Any]:
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MARKER):
        stat = path.stat()
        files[path.relative_to(directory).as_posix()] = {
            "size": stat.st_size,
            "mtime_ns": stat.st_mtime_ns,
            "blake2b": file_digest(path),
        }
    return {"version": MANIFEST_VERSION, "files": files}


def _write_marker(directory: Path, manifest: dict[str, Any]) -> None:
    """Write the marker through a temporary file and a rename: a marker is whole or absent."""
    partial = directory / f".{MARKER}.{_writer_tag()}"
    partial.write_text(json.dumps(manifest, indent=1))
    os.replace(partial, directory / MARKER)


def file_digest(path: Path, size: int = 20) -> str:
    """blake2b (``size`` bytes) of a file's content, read in blocks: a multi-GB file never sits in memory."""
    h = hashlib.blake2b(digest_size=size)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(16 << 20), b""):
            h.update(block)
    return h.hexdigest()


# -- reading ----------------------------------------------------------------------------------------------------


def entry_problem(directory: Path, full: bool = False) -> str | None:
    """``None`` when ``directory`` is a complete entry whose files are as published; else what is wrong with it.

    Each file's size and mtime are compared with the marker's record; a file whose mtime changed (a copy, a touch,
    an edit) or every file when ``full`` is re-hashed. A file that only lost its mtime gets it recorded anew, so the
    next check is cheap again.
    """
    marker = directory / MARKER
    if not directory.is_dir():
        return "absent"
    try:
        manifest = json.loads(marker.read_text())
        files = manifest["files"]
        if manifest.get("version") != MANIFEST_VERSION or not isinstance(files, dict):
            raise ValueError
    except FileNotFoundError:
        return f"no {MARKER} marker (an interrupted write, or the marker was removed)"
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return f"its {MARKER} marker holds no file manifest (written by an older qgraph, or damaged)"
    rehashed = False
    for name, record in files.items():
        path = directory / name
        try:
            stat = path.stat()
        except OSError:
            return f"{name} is missing"
        if stat.st_size != record["size"]:
            return f"{name} has {stat.st_size} bytes, {record['size']} when it was published"
        if full or stat.st_mtime_ns != record["mtime_ns"]:
            if file_digest(path) != record["blake2b"]:
                return f"{name} changed since it was published (its content digest differs)"
            record["mtime_ns"] = stat.st_mtime_ns
            rehashed = True
    if rehashed:
        with contextlib.suppress(OSError):  # a read-only cache still verifies, it only re-hashes next time too
            _write_marker(directory, manifest)
    return None


def is_complete(directory: Path) -> bool:
    """``directory`` is a complete entry whose files are as published (cheap check: sizes and mtimes)."""
    return entry_problem(directory) is None


def reuse(directory: Path, verify: bool = False) -> bool:
    """True when the entry at ``directory`` can be used as it is.

    A damaged or incomplete entry is set aside (so the caller can rebuild it) with a one-line notice naming what is
    wrong; ``verify`` re-hashes every file instead of trusting unchanged sizes and mtimes.
    """
    if directory.parent.is_dir():
        remove_stale_temporaries(directory.parent)
    problem = entry_problem(directory, full=verify)
    if problem is None:
        return True
    if problem != "absent":
        log.warning("qgraph: cache entry %s is damaged (%s); rebuilding it", directory, problem)
        _set_aside(directory)
    return False


def _set_aside(directory: Path) -> None:
    """Move a damaged entry out of the way, then delete it.

    Renamed first, so no reader sees it half-deleted; if it turns out intact once moved (another process
    republished it in between), it is put back.
    """
    aside = directory.parent / f".{directory.name}.old-{_writer_tag()}"
    try:
        os.rename(directory, aside)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise _storage_error(f"replace the damaged cache entry {directory}", exc) from exc
    if entry_problem(aside, full=True) is None:
        with contextlib.suppress(OSError):
            os.rename(aside, directory)
            return
    shutil.rmtree(aside, ignore_errors=True)


# -- leftovers of killed writers -------------------------------------------------------------------------------


def remove_stale_temporaries(parent: Path) -> list[Path]:
    """Delete the temporary and set-aside siblings in ``parent`` whose writer process on this host is gone.

    Those of another host (a shared cache) are left to that host. Returns what was removed.
    """
    removed = []
    host = socket.gethostname()
    try:
        children = list(parent.iterdir())
    except OSError:
        return removed
    for child in children:
        match = _SIBLING.match(child.name)
        if match:
            stale = match["host"] == host and not _process_alive(int(match["pid"]))
        else:
            stale = bool(_LEGACY_TMP.match(child.name)) and _older_than(child, _LEGACY_AGE_S)
        if stale and child.is_dir():
            shutil.rmtree(child, ignore_errors=True)
            if not child.exists():
                removed.append(child)
                log.info("qgraph: removed %s, left by a writer that was killed", child)
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def _older_than(path: Path, seconds: float) -> bool:
    try:
        return time.time() - path.stat().st_mtime > seconds
    except OSError:
        return False


def _writer_tag() -> str:
    return f"{os.getpid()}-{secrets.token_hex(4)}@{socket.gethostname()}"


# -- storage errors as user errors --------------------------------------------------------------------------------


def _storage(what: str, action: Callable[[], Any]) -> Any:
    try:
        return action()
    except OSError as exc:
        raise _storage_error(what, exc) from exc


def _storage_error(what: str, exc: OSError) -> CacheError:
    """A ``CacheError`` saying why the cache could not be written and what to do about it."""
    reason = {
        errno.ENOSPC: "the disk is full: free space or pass cache_dir= (--cache-dir) on another disk",
        errno.EDQUOT: "the disk quota is exhausted: free space or pass cache_dir= (--cache-dir) on another disk",
        errno.EROFS: "the file system is read-only: pass a writable cache_dir= (--cache-dir)",
        errno.EACCES: "permission denied: pass a writable cache_dir= (--cache-dir) or fix its permissions",
        errno.EPERM: "permission denied: pass a writable cache_dir= (--cache-dir) or fix its permissions",
        errno.ENOTDIR: "a path component is a file, not a directory: pass a directory as cache_dir= (--cache-dir)",
        errno.EEXIST: "a file is in the way of a directory: pass a directory as cache_dir= (--cache-dir)",
    }.get(exc.errno or 0, f"{exc.strerror or exc}")
    return CacheError(f"could not {what}: {reason}")

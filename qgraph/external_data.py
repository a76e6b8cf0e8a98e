"""Saving and loading models over the protobuf limit: tensors in external data files, split by size.

A serialized ONNX model is one protobuf message, which cannot exceed 2 GiB. ``save_model`` writes the graph to
``path`` and every tensor above ``threshold_bytes`` to external files beside it, starting a new file whenever the
current one would exceed ``shard_bytes`` (onnx_ir's sharded writer; the graph records file, offset and length per
tensor, so no index file is needed). Small models may stay in one file (``external=None`` decides by size).

Saving is safe when the model's own tensors are memory-mapped from the files being replaced (a model loaded from
``path`` and saved back to it): files are written to a fresh directory beside the target and moved in afterwards,
and external files of an earlier save that the new one does not reuse are removed. The in-memory model keeps reading
its old files' contents; ``load_model(path)`` gives the saved one. Loading maps the tensors lazily (``ir.load``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import onnx_ir as ir

PROTOBUF_LIMIT = 2**31 - 1
INLINE_LIMIT = 1 << 30  # tensor bytes above which a model is saved with external data when not told otherwise
DEFAULT_SHARD_BYTES = 1 << 30


def tensor_bytes(model: ir.Model) -> int:
    """Bytes of tensor data held by initializers (every graph, subgraphs included)."""
    return sum(v.const_value.nbytes for g in model.graphs() for v in g.initializers.values() if v.const_value)


def external_files(path: str | os.PathLike) -> list[str]:
    """The external data files a saved model refers to (relative names, in first-use order)."""
    model = ir.load(str(path))  # tensors are mapped lazily: nothing is read here
    files: dict[str, None] = {}
    for graph in model.graphs():
        for value in graph.initializers.values():
            if isinstance(value.const_value, ir.ExternalTensor):
                files[value.const_value.location] = None
    return list(files)


def save_model(
    model: ir.Model,
    path: str | os.PathLike,
    *,
    external: bool | None = None,
    shard_bytes: int | None = DEFAULT_SHARD_BYTES,
    threshold_bytes: int = 1024,
) -> list[Path]:
    """Save ``model`` to ``path``; returns the files written (the model file first).

    ``external``: True puts tensors over ``threshold_bytes`` in ``<name>.data`` files (split at ``shard_bytes``;
    None: one file); False keeps everything in the model file (fails over 2 GiB); None decides by size.
    """
    path = Path(path)
    if external is None:
        external = tensor_bytes(model) > INLINE_LIMIT
    path.parent.mkdir(parents=True, exist_ok=True)
    stale = external_files(path) if path.is_file() else []
    with tempfile.TemporaryDirectory(prefix=f".{path.name}.", dir=path.parent) as tmp:
        staged = Path(tmp) / path.name
        if external:
            ir.save(
                model,
                staged,
                external_data=f"{path.name}.data",
                size_threshold_bytes=threshold_bytes,
                max_shard_size_bytes=shard_bytes,
            )
        else:
            ir.save(model, staged)
        written = [path] + [path.parent / name for name in external_files(staged)]
        for name in stale:
            target = path.parent / name
            if target not in written and target.is_file():
                target.unlink()
        for target in written[1:] + written[:1]:  # data first: the model file never points at missing data
            shutil.move(Path(tmp) / target.name, target)
    return written


def load_model(path: str | os.PathLike) -> ir.Model:
    """Load a model saved by ``save_model`` (external tensors are memory-mapped, read on first use)."""
    return ir.load(str(path))

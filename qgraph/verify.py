"""Checking what a pass did: numerically (before/after on ONNX Runtime) and, for rule-based passes, why rules refused.

``max_abs_diff_on_ort(before, after)`` runs both graphs on ONNX Runtime with every graph optimization off (so ORT's
own fusions cannot hide or cause a difference) on the same random inputs and returns the largest absolute difference
over the outputs both graphs have. It has the signature ``run_pipeline(..., verify=...)`` expects.

Inputs are chosen for decoder graphs (the vanilla and retained-state contracts of ``qgraph.contract``): token ids
inside the vocabulary, consistent past/total lengths, valid positions; any other input gets random data of its
declared type with symbolic dimensions set to 2.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx_ir as ir

from qgraph import contract
from qgraph.contract import ATTENTION_MASK, INPUT_IDS, POSITION_IDS

# Over this many bytes of tensor data a model cannot be one protobuf message: go through a file with external data.
_INLINE_LIMIT = 1 << 30


def _vocab_size(graph: ir.Graph) -> int | None:
    """Rows of the embedding table that ``input_ids`` indexes (the first Gather reading it), if known."""
    ids = next((v for v in graph.inputs if v.name == INPUT_IDS), None)
    if ids is None:
        return None
    for node, index in ids.uses():
        if node.op_type == "Gather" and index == 1 and node.inputs[0] is not None:
            shape = node.inputs[0].shape
            if shape is not None and isinstance(shape[0], int):
                return shape[0]
    return None


def random_feeds(
    model: ir.Model, seed: int = 0, batch: int = 1, seq_len: int = 4, past_len: int = 3
) -> dict[str, np.ndarray]:
    """Random inputs of the declared types for every graph input, consistent for decoder graphs."""
    rng = np.random.default_rng(seed)
    graph = model.graph
    pairs = contract.kv_pairs(graph)
    retained = bool(pairs)
    if retained:  # the buffers' fixed length bounds the positions
        ctx = min(
            (p.input.shape[2] for p in pairs if isinstance(p.input.shape[2], int)),
            default=seq_len + past_len,
        )
        seq_len = min(seq_len, ctx)
    vocab = _vocab_size(graph) or 2
    feeds: dict[str, np.ndarray] = {}
    for value in graph.inputs:
        name = value.name or ""
        dtype = value.dtype.numpy() if value.dtype is not None else np.float32
        dims = list(value.shape.dims) if value.shape is not None else []
        if name == INPUT_IDS:
            array = rng.integers(0, vocab, size=(batch, seq_len))
        elif name == POSITION_IDS:
            start = 0 if retained else past_len
            array = np.broadcast_to(np.arange(start, start + seq_len), (batch, seq_len))
        elif name == ATTENTION_MASK:
            array = np.ones((batch, past_len + seq_len))
        else:
            shape = []
            for axis, dim in enumerate(dims):
                if isinstance(dim, int):
                    shape.append(dim)
                elif axis == 0:
                    shape.append(batch)
                elif axis == 2 and contract.vanilla_past(name):
                    shape.append(past_len)
                else:
                    shape.append(2)
            if np.issubdtype(dtype, np.floating):
                array = rng.standard_normal(shape)
            elif dtype == np.bool_:
                array = np.ones(shape)
            else:
                array = np.zeros(shape)
        feeds[name] = np.ascontiguousarray(array).astype(dtype)
    return feeds


def _tensor_bytes(model: ir.Model) -> tuple[int, bool]:
    """Total initializer bytes and whether any initializer lives in an external file."""
    total, external = 0, False
    for graph in model.graphs():
        for value in graph.initializers.values():
            tensor = value.const_value
            if tensor is None:
                continue
            total += tensor.nbytes
            external = external or isinstance(tensor, ir.ExternalTensor)
    return total, external


def ort_session(model: ir.Model, workdir: Path | None = None):
    """An ONNX Runtime CPU session over ``model`` with graph optimizations off (external data when large)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    size, external = _tensor_bytes(model)
    if size < _INLINE_LIMIT and not external:
        return ort.InferenceSession(ir.to_proto(model).SerializeToString(), options, providers=["CPUExecutionProvider"])
    if workdir is None:
        raise ValueError("a model this large needs a working directory")
    path = workdir / "model.onnx"
    ir.save(model, path, external_data="model.onnx.data")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_on_ort(model: ir.Model, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """All outputs of ``model`` for ``feeds`` (each input cast to the type this graph declares)."""
    with tempfile.TemporaryDirectory(prefix="qgraph-verify-") as tmp:
        session = ort_session(model, Path(tmp))
        declared = {v.name: v.dtype.numpy() for v in model.graph.inputs if v.dtype is not None}
        own = {name: feeds[name].astype(declared.get(name, feeds[name].dtype)) for name in declared}
        names = [o.name for o in session.get_outputs()]
        return dict(zip(names, session.run(names, own), strict=True))


def _comparable(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """``a`` and ``b`` as arrays of one shape; an axis ``b`` keeps as 1 of ``a``'s n compares ``a``'s last entry
    (e.g. logits of the last token only)."""
    if a.shape == b.shape:
        return a, b
    if a.ndim != b.ndim:
        return None
    for axis, (m, n) in enumerate(zip(a.shape, b.shape, strict=True)):
        if m != n:
            if n != 1:
                return None
            a = np.take(a, [m - 1], axis=axis)
    return a, b


def _external_tensors(model: ir.Model) -> list[ir.ExternalTensor]:
    return [
        v.const_value
        for g in model.graphs()
        for v in g.initializers.values()
        if isinstance(v.const_value, ir.ExternalTensor)
    ]


def _borrow_base_dir(model: ir.Model, other: ir.Model) -> None:
    """A copy made through protobuf (``ir.from_proto(ir.to_proto(m))``) forgets where its external data lives; the
    other graph of the pair, read from the same file, still knows."""
    import os

    lost = [t for t in _external_tensors(model) if not os.path.exists(t.path)]
    known = {t.location: t.base_dir for t in _external_tensors(other) if os.path.exists(t.path)}
    base_dirs = {known[t.location] for t in lost if t.location in known}
    if len(base_dirs) == 1:
        ir.external_data.set_base_dir(model.graph, base_dirs.pop())


def max_abs_diff_on_ort(before: ir.Model, after: ir.Model, seed: int = 0) -> float:
    """Largest |before - after| over the outputs both graphs have, on the same random inputs (ORT, no optimizations).

    ``inf`` when one graph produces a non-finite value where the other does not, or when no output is comparable.
    """
    _borrow_base_dir(before, after)
    _borrow_base_dir(after, before)
    feeds = random_feeds(before, seed)
    feeds.update({k: v for k, v in random_feeds(after, seed).items() if k not in feeds})
    out_before = run_on_ort(before, feeds)
    out_after = run_on_ort(after, feeds)
    worst, compared = 0.0, 0
    for name, a in out_before.items():
        if name not in out_after:
            continue
        pair = _comparable(np.asarray(a, np.float64), np.asarray(out_after[name], np.float64))
        if pair is None:
            continue
        x, y = pair
        compared += 1
        finite = np.isfinite(x) & np.isfinite(y)
        if not np.array_equal(np.isfinite(x), np.isfinite(y)) or not np.array_equal(x[~finite], y[~finite]):
            return math.inf
        if finite.any():
            worst = max(worst, float(np.abs(x[finite] - y[finite]).max()))
    return worst if compared else math.inf


# -- why rewrite rules did not fire ---------------------------------------------------------------------------------


def rule_misses(model: ir.Model, rule_sets: Iterable) -> list[str]:
    """Every place where a rule's pattern matched but its ``check`` refused, with the reason the rule gave.

    Nothing is rewritten (onnxscript's matching tracer is used). Shapes like ``"RMSNorm[weight] at node_mul_3:
    weight shape [64, 64] is not [hidden]: this Mul is not a norm weight"``.
    """
    from qgraph.onnxscript_compat import MatchingTracer, MatchStatus

    misses: dict[str, None] = {}

    class _Tracer(MatchingTracer):
        def log(self, rule, container, node, match_result, status) -> None:
            if container is model.graph and status in (MatchStatus.CONDITION_FAILED, MatchStatus.REPLACEMENT_FAILED):
                where = node.name or node.op_type
                misses[f"{rule.name} at {where}: {match_result.reason or status.name}"] = None

    tracer = _Tracer()
    for rules in rule_sets:
        rules.apply_to_model(model, tracer=tracer)
    return list(misses)

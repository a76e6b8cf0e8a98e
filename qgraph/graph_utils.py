"""Small, model-agnostic helpers for reading and editing ``onnx_ir`` graphs."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import onnx_ir as ir

# Ops whose outputs carry facts about a tensor's shape, not its data.
SHAPE_ONLY_OPS = frozenset({"Shape", "Size"})


def const(values, dtype=None, name: str | None = None) -> ir.Node:
    """A ``Constant`` node holding ``values`` (use ``node.outputs[0]``)."""
    array = np.asarray(values, dtype=dtype)
    node = ir.node("Constant", [], attributes={"value": ir.tensor(array)})
    if name:
        node.outputs[0].name = name
    return node


def data_dependents(graph: ir.Graph, sources: Iterable[ir.Value]) -> set[ir.Value]:
    """Every value whose *data* depends on one of ``sources``.

    Reading a tensor's shape (``Shape``/``Size``) does not count as depending on its data: the mask of an attention
    layer reads the shape of the key tensor, yet it is still "the mask", not "the scores".
    """
    tainted = set(sources)
    for node in graph:  # graphs are kept in topological order
        if node.op_type in SHAPE_ONLY_OPS and node.domain in ("", "ai.onnx"):
            continue
        if any(v is not None and v in tainted for v in node.inputs):
            tainted.update(node.outputs)
    return tainted


def consumers(value: ir.Value) -> list[ir.Node]:
    return [user for user, _ in value.uses()]


def input_by_name(graph: ir.Graph, name: str) -> ir.Value | None:
    return next((v for v in graph.inputs if v.name == name), None)


def attr_int(node: ir.Node, name: str, default: int | None = None) -> int | None:
    attr = node.attributes.get(name)
    return default if attr is None else int(attr.value)


def replace_all_uses(old: ir.Value, new: ir.Value) -> None:
    """Point every consumer of ``old`` (and a graph output slot holding it) at ``new``."""
    for user, index in list(old.uses()):
        user.replace_input_with(index, new)


def prepend(graph: ir.Graph, nodes: Sequence[ir.Node]) -> None:
    """Insert nodes that only read graph inputs or constants at the front of the graph."""
    first = next(iter(graph), None)
    if first is None:
        graph.extend(nodes)
    else:
        graph.insert_before(first, nodes)


def float_min(dtype: ir.DataType) -> float:
    """The most negative finite value of a float type: what HF uses for "masked"."""
    return float(np.finfo(dtype.numpy()).min)

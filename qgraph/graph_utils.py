"""Small, model-agnostic helpers for reading and editing ``onnx_ir`` graphs."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import onnx_ir as ir

from qgraph.domains import MS_DOMAIN  # noqa: F401 - re-exported: passes import it from here

# Ops whose outputs carry facts about a tensor's shape, not its data.
SHAPE_ONLY_OPS = frozenset({"Shape", "Size"})


def const(values, dtype=None, name: str | None = None) -> ir.Node:
    """A ``Constant`` node holding ``values`` (use ``node.outputs[0]``)."""
    array = np.asarray(values, dtype=dtype)
    node = ir.node("Constant", [], attributes={"value": ir.tensor(array)})
    if name:
        node.outputs[0].name = name
    return node


def derived_name(node: ir.Node, suffix: str) -> str | None:
    """A name for a node that replaces or derives from ``node``: its name plus ``suffix``, or none when it has none
    (ONNX allows many unnamed nodes, not two of one name; ``"_suffix"`` alone would repeat)."""
    return f"{node.name}_{suffix}" if node.name else None


def initializer_value(name: str, array: np.ndarray) -> ir.Value:
    """A typed, shaped value holding ``array``, ready to register as an initializer of some graph."""
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)))
    value.const_value = ir.tensor(array, name=name)
    return value


def add_initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """Register ``array`` as a typed, shaped initializer ``name`` of ``graph``; returns its value."""
    value = initializer_value(name, array)
    graph.register_initializer(value)
    return value


def producer_op(value: ir.Value | None, op_type: str, domain: str = "") -> ir.Node | None:
    """The node producing ``value`` when it is ``op_type`` of ``domain`` ("" also matches "ai.onnx"), else None."""
    node = value.producer() if value is not None else None
    if node is None or node.op_type != op_type:
        return None
    return node if node.domain == domain or (domain == "" and node.domain == "ai.onnx") else None


def const_ints(value: ir.Value | None) -> list[int] | None:
    """The integers a constant value holds (an initializer or a ``Constant`` node's output), flattened; else None."""
    tensor = ir.convenience.get_const_tensor(value) if value is not None else None
    return None if tensor is None else [int(x) for x in np.asarray(tensor.numpy()).reshape(-1)]


def scalar(value: ir.Value | None) -> float | None:
    """The number a one-element constant holds (an initializer or a ``Constant`` node's output), else None."""
    tensor = ir.convenience.get_const_tensor(value) if value is not None else None
    if tensor is None or tensor.size != 1:
        return None
    return float(np.asarray(tensor.numpy()).reshape(-1)[0])


def static_dim(shape: ir.Shape | None, index: int, rank: int | None = None) -> int | None:
    """Dimension ``index`` of ``shape`` when it is a known integer (and the shape has ``rank``, if given), else None."""
    if shape is None or (rank is not None and shape.rank() != rank) or not -shape.rank() <= index < shape.rank():
        return None
    dim = shape[index]
    return dim if isinstance(dim, int) else None


def onnx_opset(model: ir.Model) -> int:
    """The model's standard ONNX opset version (imported as "" or "ai.onnx")."""
    return model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1))


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


def backward_cone(values: Iterable[ir.Value]) -> set[ir.Node]:
    """Every node some of ``values`` is computed from (their producers, transitively)."""
    cone: set[ir.Node] = set()
    stack = [v.producer() for v in values]
    while stack:
        node = stack.pop()
        if node is None or node in cone:
            continue
        cone.add(node)
        stack.extend(v.producer() for v in node.inputs if v is not None)
    return cone


def evaluate(model: ir.Model, values: Sequence[ir.Value], feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """Compute ``values`` of ``model`` on ONNX Runtime, running only the nodes they depend on.

    A pass uses this to read facts off a graph that are easier to measure than to pattern-match (e.g. which keys an
    attention mask lets each query see). ``feeds`` must hold every graph input those nodes read; the initializers they
    read are copied, nothing else is. The model itself is not changed, except that unnamed values in the cone get a
    name (ONNX protobuf wires nodes by name).
    """
    import onnx
    import onnxruntime as ort

    graph = model.graph
    cone = backward_cone(values)
    nodes = [n for n in graph if n in cone]
    read: dict[ir.Value, None] = {}
    for node in nodes:
        for v in node.inputs:
            if v is not None:
                read[v] = None
    for i, node in enumerate(nodes):
        for j, v in enumerate(node.outputs):
            if not v.name:
                v.name = f"_qgraph_eval_{i}_{j}"
    inputs = [v for v in graph.inputs if v in read]
    missing = [v.name for v in inputs if v.name not in feeds]
    if missing:
        raise ValueError(f"evaluate: no feed for graph input(s) {', '.join(map(str, missing))}")
    initializers = []
    for v in read:
        if v.producer() is not None or v in inputs:
            continue
        if v.const_value is None:
            raise ValueError(f"evaluate: value {v.name} has no producer, is no graph input and holds no constant")
        # through numpy: an initializer stored as external data must travel with its bytes
        tensor = ir.serde.serialize_tensor(ir.tensor(v.const_value.numpy(), name=v.name))
        initializers.append(tensor)
    proto = onnx.helper.make_model(
        onnx.helper.make_graph(
            [ir.serde.serialize_node(n) for n in nodes],
            "evaluate",
            [ir.serde.serialize_value(v) for v in inputs],
            [onnx.helper.make_empty_tensor_value_info(v.name) for v in values],
            initializers,
        ),
        opset_imports=[onnx.helper.make_opsetid(domain, version) for domain, version in model.opset_imports.items()],
        ir_version=model.ir_version,
    )
    proto.functions.extend(ir.serde.serialize_function(f) for f in model.functions.values())
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run([v.name for v in values], {v.name: feeds[v.name] for v in inputs})

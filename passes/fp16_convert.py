"""fp16 conversion: weights and activations in float16, numerically sensitive ops kept in float32, logits in float32.

Why: float16 halves the bytes every decode step reads (weights and KV cache), which is what batch-1 decoding is
bound by; targets with fast float16 arithmetic (GPUs) also compute faster. Some computations lose too much in
float16 and stay in float32:

- ops on the **block list** (``block_ops``; default: the norm pieces ``Pow, ReduceMean, Sqrt, Reciprocal``, which
  overflow on ``x**2``; ``Exp, Log, Softmax`` stay float16 unless listed);
- **position arithmetic**: ``Cos``/``Sin``/``Range``/``CumSum`` and everything they are computed from, when that
  comes only from integer inputs and small constant tables (RoPE angles ``position * inv_freq`` reach thousands of
  radians, where float16 has a resolution of 0.5-4);
- nodes whose float inputs all come from float32 nodes (e.g. the ``+ eps`` between ``ReduceMean`` and ``Sqrt``).

Everything else computes in float16. Float32 initializers and constants feeding float16 nodes are converted
(saturating at +-65504; run ``fp16-clip`` first so masks keep their meaning), ``Cast(to=float)`` in float16 code
becomes ``Cast(to=float16)``, and a ``Cast`` is inserted wherever a value crosses between the two precisions. Graph
inputs and outputs are typed as the backend wants: ``float32_io`` names stay float32 (default: ``logits``), every
other float input/output, the KV buffers included, becomes float16. Inserted casts are marked (node metadata
``qgraph.fp16=boundary``) so a second run recognises them: the pass is idempotent.

Counts: ``float16_nodes``, ``float32_nodes``, ``initializers_converted``, ``casts_inserted``, ``io_converted``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import PreconditionError

from qgraph.contract import LOGITS
from qgraph.pass_manager import CountedResult, GraphPass

F32, F16 = ir.DataType.FLOAT, ir.DataType.FLOAT16
FP16_MAX = float(np.finfo(np.float16).max)
MARK = "qgraph.fp16"
DEFAULT_BLOCK_OPS = ("Pow", "ReduceMean", "ReduceSumSquare", "Sqrt", "Reciprocal", "Cos", "Sin", "Range", "CumSum")
POSITION_OPS = frozenset({"Cos", "Sin", "Range", "CumSum"})
SMALL_TABLE = 4096  # elements: a constant this small read by position arithmetic is a table (inv_freq), not a weight
# (op_type, input index) that must stay float32 whatever the node computes in
FLOAT32_SLOTS = frozenset({("Resize", 2), ("Upsample", 1)})
# outputs whose type does not follow the inputs
_BOOL_OPS = frozenset(
    {"Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "And", "Or", "Xor", "Not", "IsNaN", "IsInf"}
)
_INT_OPS = frozenset({"Shape", "Size", "ArgMax", "ArgMin", "NonZero", "NonMaxSuppression"})
# outputs that are a norm's statistics, typed by its stash_type (float32) whatever the input type: they stay float32
STATISTICS_OUTPUTS = {
    "LayerNormalization": frozenset({1, 2}),
    "SimplifiedLayerNormalization": frozenset({1}),
    "SkipLayerNormalization": frozenset({1, 2}),
    "SkipSimplifiedLayerNormalization": frozenset({1, 2}),
}


def _is_std(node: ir.Node) -> bool:
    return node.domain in ("", "ai.onnx")


def _attr_dtype(node: ir.Node) -> ir.DataType | None:
    """The output type a node's attributes fix, if they do."""
    if node.op_type == "Cast" and _is_std(node):
        return ir.DataType(node.attributes["to"].as_int())
    if node.op_type == "Constant" and _is_std(node):
        attr = node.attributes.get("value")
        if attr is not None and attr.type == ir.AttributeType.TENSOR:
            return attr.as_tensor().dtype
        if "value_float" in node.attributes or "value_floats" in node.attributes:
            return F32
        return ir.DataType.INT64 if ("value_int" in node.attributes or "value_ints" in node.attributes) else None
    if node.op_type == "ConstantOfShape" and _is_std(node):
        attr = node.attributes.get("value")
        return attr.as_tensor().dtype if attr is not None else F32
    return None


def fill_dtypes(graph: ir.Graph) -> int:
    """Give every node output without a type the type ONNX semantics imply (rewrites create untyped values)."""
    filled = 0
    for node in graph:
        for index, out in enumerate(node.outputs):
            if out.dtype is not None:
                continue
            dtype = _attr_dtype(node) if index == 0 else None
            if dtype is None and _is_std(node):
                if node.op_type in _BOOL_OPS:
                    dtype = ir.DataType.BOOL
                elif node.op_type in _INT_OPS:
                    dtype = ir.DataType.INT64
                elif node.op_type in ("Where",) and len(node.inputs) == 3:
                    dtype = node.inputs[1].dtype
                elif node.op_type == "CastLike":
                    dtype = node.inputs[1].dtype
            if dtype is None:  # most ops (and ORT's contrib ops) compute in the type of their first float input
                floats = [
                    v.dtype
                    for v in node.inputs
                    if v is not None and v.dtype is not None and v.dtype.is_floating_point()
                ]
                dtype = floats[0] if floats else None
            if dtype is not None:
                out.dtype = dtype
                filled += 1
    return filled


def _float32_inputs(node: ir.Node) -> list[ir.Value]:
    return [v for v in node.inputs if v is not None and v.dtype == F32]


def _is_constant(value: ir.Value) -> bool:
    producer = value.producer()
    return value.const_value is not None or (producer is not None and producer.op_type == "Constant")


def _is_boundary(node: ir.Node) -> bool:
    return node.metadata_props.get(MARK) == "boundary"


class FP16Convert(GraphPass):
    """float32 -> float16 for weights and activations, with a float32 block list and float32 logits."""

    name = "fp16-convert"
    summary = "weights/activations to float16; norm pieces and position math stay float32; logits float32"

    def __init__(self, float32_io: Sequence[str] = (LOGITS,), block_ops: Sequence[str] = DEFAULT_BLOCK_OPS):
        self.float32_io = frozenset(float32_io)
        self.block_ops = frozenset(block_ops)

    def requires(self, model: ir.Model) -> None:
        for node in model.graph:
            if any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in node.attributes.values()):
                raise PreconditionError(
                    f"node {node.name} ({node.op_type}) has a subgraph; fp16-convert handles flat graphs only"
                )

    # -- which nodes stay float32 -----------------------------------------------------------------------------

    def _position_cone(self, node: ir.Node) -> set[ir.Node] | None:
        """The nodes ``node`` is computed from, when they read only integers, small tables and no float input."""
        cone: set[ir.Node] = set()
        stack = [node]
        while stack:
            current = stack.pop()
            if current in cone:
                continue
            cone.add(current)
            for value in current.inputs:
                if value is None:
                    continue
                producer = value.producer()
                if producer is None:
                    if value.is_graph_input() and value.dtype is not None and value.dtype.is_floating_point():
                        return None  # activations (e.g. the KV cache) flow in
                    tensor = value.const_value
                    if tensor is not None and tensor.dtype.is_floating_point() and tensor.size > SMALL_TABLE:
                        return None  # a weight: this is not position arithmetic
                    continue
                if _is_constant(value) and value.const_value is not None and value.const_value.size > SMALL_TABLE:
                    return None
                stack.append(producer)
        return cone

    def float32_nodes(self, graph: ir.Graph) -> set[ir.Node]:
        keep = {n for n in graph if _is_std(n) and n.op_type in self.block_ops}
        for node in [n for n in keep if n.op_type in POSITION_OPS]:
            cone = self._position_cone(node)
            if cone:
                keep |= {n for n in cone if any(o.dtype == F32 for o in n.outputs) or n is node}
        for node in graph:  # forward closure: float32 in, float32 out
            if node in keep or _is_boundary(node) or node.op_type == "Constant":
                continue
            computed = [v for v in _float32_inputs(node) if not _is_constant(v)]
            if computed and all(v.producer() in keep for v in computed):
                keep.add(node)
        return keep

    # -- the conversion -------------------------------------------------------------------------------------------

    def call(self, model: ir.Model) -> CountedResult:
        graph = model.graph
        fill_dtypes(graph)
        keep = self.float32_nodes(graph)
        casts: dict[tuple[ir.Value, ir.DataType], ir.Value] = {}
        counts = dict(float16_nodes=0, float32_nodes=0, initializers_converted=0, casts_inserted=0, io_converted=0)
        original = {  # every value typed float32 before the pass, and whether it becomes float16
            v: None for v in (*graph.inputs, *graph.initializers.values(), *(o for n in graph for o in n.outputs))
        }
        new_type: dict[ir.Value, ir.DataType] = {}
        for value in graph.inputs:
            if value.dtype == F32 and value.name not in self.float32_io:
                new_type[value] = F16
                counts["io_converted"] += 1
        for value in graph.initializers.values():
            if value.dtype == F32 and value.const_value is not None and not value.is_graph_input():
                users = [u for u, _ in value.uses() if not _is_boundary(u)]
                if any(u not in keep for u in users):
                    new_type[value] = F16
        for node in graph:
            if _is_boundary(node):
                continue
            precision = F32 if node in keep else F16
            if node.op_type == "Constant" and _is_std(node):
                users = [u for u, _ in node.outputs[0].uses() if not _is_boundary(u)]
                if node.outputs[0].dtype == F32 and any(u not in keep for u in users):
                    new_type[node.outputs[0]] = F16
                continue
            counts["float32_nodes" if node in keep else "float16_nodes"] += any(o.dtype == F32 for o in node.outputs)
            if precision == F16:
                self._retype_attributes(node)
                statistics = STATISTICS_OUTPUTS.get(node.op_type, frozenset())
                for index, out in enumerate(node.outputs):
                    if out.dtype == F32 and index not in statistics:
                        new_type[out] = F16
        # convert the data of constants that become float16
        for value, dtype in new_type.items():
            if dtype != F16:
                continue
            if value.const_value is not None and value.producer() is None:
                value.const_value = _to_float16(value.const_value)
                counts["initializers_converted"] += 1
            producer = value.producer()
            if producer is not None and producer.op_type == "Constant":
                self._constant_to_float16(producer)
                counts["initializers_converted"] += 1
        # insert casts where a value meets a node of the other precision
        for node in list(graph):
            if _is_boundary(node) or (node.op_type in ("Cast", "Shape", "Size") and _is_std(node)):
                continue  # these read any type
            want = F32 if node in keep else F16
            for index, value in enumerate(node.inputs):
                if value is None or value not in original or value.dtype != F32:
                    continue
                slot_want = F32 if (node.op_type, index) in FLOAT32_SLOTS else want
                have = new_type.get(value, F32)
                if have != slot_want:
                    node.replace_input_with(index, self._cast(graph, value, slot_want, casts, counts))
        for value, dtype in new_type.items():
            value.type = ir.TensorType(dtype)  # a new type object: types may be shared (rewrites, clones)
        self._type_outputs(graph, new_type, counts)
        result = self.result(model, **counts)
        result.modified = any(v for k, v in counts.items() if k != "float32_nodes")  # float32_nodes: a census
        return result

    @staticmethod
    def _retype_attributes(node: ir.Node) -> None:
        """Attributes that fix a float32 output, in a node that now computes in float16."""
        if not _is_std(node):
            return
        if node.op_type == "Cast" and node.attributes["to"].as_int() == F32:
            node.attributes["to"] = ir.AttrInt64("to", F16)
        elif node.op_type == "ConstantOfShape":
            attr = node.attributes.get("value")
            if attr is None:
                node.attributes["value"] = ir.AttrTensor("value", ir.tensor(np.zeros([1], np.float16)))
            elif attr.as_tensor().dtype == F32:
                node.attributes["value"] = ir.AttrTensor("value", _to_float16(attr.as_tensor()))
        elif "dtype" in node.attributes and node.attributes["dtype"].as_int() == F32:
            node.attributes["dtype"] = ir.AttrInt64("dtype", F16)

    @staticmethod
    def _constant_to_float16(node: ir.Node) -> None:
        for name in ("value", "value_float", "value_floats"):
            attr = node.attributes.pop(name, None)
            if attr is None:
                continue
            if attr.type == ir.AttributeType.TENSOR:
                tensor = _to_float16(attr.as_tensor())
            else:
                tensor = ir.tensor(np.asarray(attr.value, np.float32).astype(np.float16))
            node.attributes["value"] = ir.AttrTensor("value", tensor)
            node.outputs[0].const_value = tensor

    @staticmethod
    def _cast(
        graph: ir.Graph,
        value: ir.Value,
        dtype: ir.DataType,
        casts: dict[tuple[ir.Value, ir.DataType], ir.Value],
        counts: dict[str, int],
    ) -> ir.Value:
        key = (value, dtype)
        if key not in casts:
            cast = ir.node("Cast", [value], attributes={"to": int(dtype)}, metadata_props={MARK: "boundary"})
            out = cast.outputs[0]
            out.name = f"{value.name}_{'fp16' if dtype == F16 else 'fp32'}"
            out.dtype, out.shape = dtype, value.shape
            producer = value.producer()
            if producer is not None and producer.graph is graph:
                graph.insert_after(producer, cast)
            else:
                first = next(iter(graph))
                graph.insert_before(first, cast)
            casts[key] = out
            counts["casts_inserted"] += 1
        return casts[key]

    def _type_outputs(self, graph: ir.Graph, new_type: dict[ir.Value, ir.DataType], counts: dict[str, int]) -> None:
        """Graph outputs in the types the backend wants: ``float32_io`` float32, other floats float16."""
        for i, value in enumerate(list(graph.outputs)):
            if value.dtype not in (F32, F16) or value.is_graph_input() or value.producer() is None:
                continue
            if _is_boundary(value.producer()):
                continue  # a previous run's output cast
            want = F32 if value.name in self.float32_io else F16
            if value.dtype == want:
                if value in new_type:
                    counts["io_converted"] += 1
                continue
            name = value.name
            value.name = f"{name}_{'fp16' if value.dtype == F16 else 'fp32'}"
            cast = ir.node("Cast", [value], attributes={"to": int(want)}, metadata_props={MARK: "boundary"})
            cast.outputs[0].name, cast.outputs[0].dtype, cast.outputs[0].shape = name, want, value.shape
            graph.append(cast)
            graph.outputs[i] = cast.outputs[0]
            counts["casts_inserted"] += 1
            counts["io_converted"] += want == F16


def _to_float16(tensor: ir.TensorProtocol) -> ir.Tensor:
    """float32 -> float16, saturating at +-65504 (inf stays inf, NaN stays NaN)."""
    array = tensor.numpy()
    finite = np.isfinite(array)
    array = np.where(finite, np.clip(array, -FP16_MAX, FP16_MAX), array)
    return ir.tensor(array.astype(np.float16), name=tensor.name)

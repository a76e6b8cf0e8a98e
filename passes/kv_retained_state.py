"""KV cache as fixed-size retained state, updated at ``position_ids``.

Turns a vanilla decoder export (``past_key_values.{i}.key|value`` grown by ``Concat`` each step, mask built from
``attention_mask``) into the retained-state contract of DESIGN.md:

- inputs ``input_ids``, ``position_ids`` (-1 = padding), ``past_key.{i}`` / ``past_value.{i}`` of static length
  ``ctx_len``; outputs ``logits``, ``past_key.{i}_RetainedState`` / ``past_value.{i}_RetainedState``;
- each ``Concat(past, new, axis=-2)`` becomes ``ScatterElements(past, position_ids, new, axis=2)``. Position -1
  writes to the last slot, which no query attends until decode reaches it (and writes it first);
- the attention mask is rebuilt from ``position_ids`` (key slot ``k`` is visible to a query at position ``p`` iff
  ``k <= p``), so padding queries see nothing and nothing sees padding;
- the graph's own length arithmetic (``past_len + seq_len`` from ``Shape`` reads of the past inputs) is kept
  consistent by making those reads report a virtual past length ``ctx_len - seq_len``: total length = ``ctx_len``.

Everything is found by graph structure: the pass names no model and fails with what it did not find.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import PostconditionError, PreconditionError
from onnx_ir.passes.common import RemoveUnusedNodesPass, TopologicalSortPass

from qgraph.graph_utils import (
    attr_int,
    const,
    consumers,
    data_dependents,
    float_min,
    input_by_name,
    prepend,
    replace_all_uses,
)
from qgraph.pass_manager import CountedResult, GraphPass

VANILLA_PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
RETAINED_INPUT = "past_{kind}.{layer}"
RETAINED_OUTPUT = "past_{kind}.{layer}_RetainedState"


@dataclass
class KVAppend:
    """One per KV tensor: the vanilla past input and the ``Concat`` that appends the new step to it."""

    layer: int
    kind: str  # "key" or "value"
    past: ir.Value
    concat: ir.Node

    @property
    def new(self) -> ir.Value:
        return self.concat.inputs[1]


def find_kv_appends(graph: ir.Graph) -> list[KVAppend]:
    """Every vanilla past input with its append ``Concat``; raises ``PreconditionError`` naming what is missing."""
    appends = []
    for value in graph.inputs:
        match = VANILLA_PAST.match(value.name or "")
        if not match:
            continue
        concats = [n for n in consumers(value) if n.op_type == "Concat"]
        rank = value.shape.rank() if value.shape is not None else None
        valid = [
            n
            for n in concats
            if len(n.inputs) == 2
            and n.inputs[0] is value
            and rank is not None
            and attr_int(n, "axis") in (rank - 2, -2)
        ]
        if len(valid) != 1:
            users = ", ".join(f"{n.op_type}({n.name})" for n in consumers(value)) or "nothing"
            raise PreconditionError(
                f"input {value.name} is not appended to by exactly one Concat(past, new, axis=-2) "
                f"(found {len(valid)}; its consumers: {users})"
            )
        appends.append(KVAppend(int(match.group(1)), match.group(2), value, valid[0]))
    if not appends:
        names = ", ".join(v.name or "?" for v in graph.inputs)
        raise PreconditionError(
            f"no past_key_values.{{i}}.key|value inputs (graph inputs: {names}); not a vanilla decoder export with KV"
        )
    return sorted(appends, key=lambda a: (a.layer, a.kind != "key"))


def find_mask_values(graph: ir.Graph, attention_mask: ir.Value, input_ids: ir.Value) -> list[ir.Value]:
    """The attention-mask tensors where they meet the attention computation.

    A mask value depends on ``attention_mask``'s data and not on ``input_ids``'s; the ones we want are those consumed
    by a node that also reads something computed from ``input_ids`` (the scores). Data flow, not op names, decides:
    every layer's scores also depend on ``attention_mask`` through earlier layers, so "the Add before Softmax that
    depends on attention_mask" would wrongly catch them too.
    """
    from_mask = data_dependents(graph, [attention_mask])
    from_ids = data_dependents(graph, [input_ids])
    frontier: dict[ir.Value, None] = {}
    for node in graph:
        if not any(v in from_ids for v in node.inputs if v is not None):
            continue
        for v in node.inputs:
            if v is not None and v in from_mask and v not in from_ids:
                frontier[v] = None
    return list(frontier)


class KVRetainedState(GraphPass):
    """Vanilla KV Concat -> fixed ``ctx_len`` buffers scattered at ``position_ids``; mask from ``position_ids``."""

    name = "kv-retained-state"
    summary = "KV cache as fixed-size retained state updated at position_ids; mask derived from position_ids"

    def __init__(self, ctx_len: int = 128):
        if int(ctx_len) < 2:
            raise ValueError(f"ctx_len must be at least 2, got {ctx_len}")
        self.ctx_len = int(ctx_len)

    def _graph_inputs(self, graph: ir.Graph) -> tuple[ir.Value, ir.Value, ir.Value]:
        found = {name: input_by_name(graph, name) for name in ("input_ids", "attention_mask", "position_ids")}
        missing = [name for name, value in found.items() if value is None]
        if missing:
            raise PreconditionError(
                f"graph has no input {', '.join(missing)} (inputs: {', '.join(v.name or '?' for v in graph.inputs)})"
            )
        return found["input_ids"], found["attention_mask"], found["position_ids"]

    def requires(self, model: ir.Model) -> None:
        graph = model.graph
        input_ids, attention_mask, _ = self._graph_inputs(graph)
        find_kv_appends(graph)
        if not find_mask_values(graph, attention_mask, input_ids):
            raise PreconditionError(
                "found no attention mask: no value computed from attention_mask (and not from input_ids) meets the "
                "attention scores"
            )

    def call(self, model: ir.Model) -> CountedResult:
        graph = model.graph
        input_ids, attention_mask, position_ids = self._graph_inputs(graph)
        appends = find_kv_appends(graph)
        masks = find_mask_values(graph, attention_mask, input_ids)
        shape_reads = self._virtualise_past_shape_reads(graph, input_ids, [a.past for a in appends])
        self._replace_masks(graph, masks, position_ids)
        for append in appends:
            self._scatter_instead_of_concat(graph, append, position_ids)
        still_reading = consumers(attention_mask)
        RemoveUnusedNodesPass()(model)
        still_reading = consumers(attention_mask)
        if still_reading:
            raise PostconditionError(
                "attention_mask is still read by "
                + ", ".join(f"{n.op_type}({n.name})" for n in still_reading)
                + " after the mask was rebuilt from position_ids; this graph uses attention_mask in a way the pass "
                "does not understand"
            )
        graph.inputs.remove(attention_mask)
        TopologicalSortPass()(model)
        return self.result(model, kv_scatters=len(appends), masks_rebuilt=len(masks), shape_reads=shape_reads)

    # -- the three rewrites -------------------------------------------------------------------------------------

    def _virtualise_past_shape_reads(self, graph: ir.Graph, input_ids: ir.Value, pasts: list[ir.Value]) -> int:
        """``Shape(past)`` reports ``[.., ctx_len - seq_len, ..]`` so ``past_len + seq_len`` equals ``ctx_len``."""
        reads = [n for p in pasts for n in consumers(p) if n.op_type == "Shape"]
        if not reads:
            return 0
        seq_len = ir.node("Shape", [input_ids], attributes={"start": 1, "end": 2})
        zeros = const([0, 0], np.int64)
        tail = const([0], np.int64)
        offset = ir.node("Concat", [zeros.outputs[0], seq_len.outputs[0], tail.outputs[0]], attributes={"axis": 0})
        new_nodes: list[ir.Node] = [seq_len, zeros, tail, offset]
        for read in reads:
            full = ir.node("Shape", [read.inputs[0]])
            virtual = ir.node("Sub", [full.outputs[0], offset.outputs[0]])
            new_nodes += [full, virtual]
            result = virtual.outputs[0]
            start, end = attr_int(read, "start"), attr_int(read, "end")
            if start is not None or end is not None:
                starts = const([start or 0], np.int64)
                ends = const([end if end is not None else np.iinfo(np.int64).max], np.int64)
                sliced = ir.node("Slice", [result, starts.outputs[0], ends.outputs[0]])
                new_nodes += [starts, ends, sliced]
                result = sliced.outputs[0]
            replace_all_uses(read.outputs[0], result)
        prepend(graph, new_nodes)
        return len(reads)

    def _replace_masks(self, graph: ir.Graph, masks: list[ir.Value], position_ids: ir.Value) -> None:
        """Each mask becomes ``key_slot <= query_position`` in the mask's own form (boolean or additive)."""
        slots = const(np.arange(self.ctx_len, dtype=np.int64), name="kv_slot_positions")
        axes = const([1, 3], np.int64)
        query = ir.node("Unsqueeze", [position_ids, axes.outputs[0]])  # [b, 1, s, 1]
        visible = ir.node("LessOrEqual", [slots.outputs[0], query.outputs[0]])  # [b, 1, s, ctx_len]
        visible.outputs[0].name = "kv_visible"
        new_nodes = [slots, axes, query, visible]
        additive: dict[ir.DataType, ir.Value] = {}
        for mask in masks:
            if mask.dtype == ir.DataType.BOOL:
                replace_all_uses(mask, visible.outputs[0])
                continue
            if mask.dtype not in additive:
                zero = const(np.zeros((), mask.dtype.numpy()))
                blocked = const(np.array(float_min(mask.dtype), mask.dtype.numpy()))
                where = ir.node("Where", [visible.outputs[0], zero.outputs[0], blocked.outputs[0]])
                where.outputs[0].name = f"kv_additive_mask_{mask.dtype.name.lower()}"
                new_nodes += [zero, blocked, where]
                additive[mask.dtype] = where.outputs[0]
            replace_all_uses(mask, additive[mask.dtype])
        prepend(graph, new_nodes)

    def _scatter_instead_of_concat(self, graph: ir.Graph, append: KVAppend, position_ids: ir.Value) -> None:
        past, concat = append.past, append.concat
        past.name = RETAINED_INPUT.format(kind=append.kind, layer=append.layer)
        if past.shape is not None:
            dims = list(past.shape.dims)
            dims[-2] = self.ctx_len
            past.shape = ir.Shape(dims)
        axes = const([1, 3], np.int64)
        where_to = ir.node("Unsqueeze", [position_ids, axes.outputs[0]])  # [b, 1, s, 1]
        new_shape = ir.node("Shape", [append.new])
        indices = ir.node("Expand", [where_to.outputs[0], new_shape.outputs[0]])
        scatter = ir.node("ScatterElements", [past, indices.outputs[0], append.new], attributes={"axis": 2})
        old_out = concat.outputs[0]
        out = scatter.outputs[0]
        out.name = None
        out.dtype, out.shape = past.dtype, past.shape
        graph.insert_after(concat, [axes, where_to, new_shape, indices, scatter])
        replace_all_uses(old_out, out)
        if old_out.is_graph_output():
            graph.outputs[graph.outputs.index(old_out)] = out
        old_out.name = None
        out.name = RETAINED_OUTPUT.format(kind=append.kind, layer=append.layer)
        graph.remove(concat, safe=True)

    def ensures(self, model: ir.Model) -> None:
        assert_retained_state_contract(model.graph, self.ctx_len)


def assert_retained_state_contract(graph: ir.Graph, ctx_len: int) -> None:
    """The I/O contract of DESIGN.md; raises ``PostconditionError`` saying which part does not hold."""
    names_in = [v.name for v in graph.inputs]
    names_out = [v.name for v in graph.outputs]
    problems = []
    if "attention_mask" in names_in:
        problems.append("attention_mask is still an input")
    for required in ("input_ids", "position_ids"):
        if required not in names_in:
            problems.append(f"{required} is not an input")
    pasts = [v for v in graph.inputs if re.match(r"^past_(key|value)\.\d+$", v.name or "")]
    if not pasts:
        problems.append("no past_key.{i}/past_value.{i} inputs")
    for value in pasts:
        if value.shape is None or value.shape[-2] != ctx_len:
            problems.append(f"{value.name} has shape {value.shape}, not ctx_len {ctx_len} on axis -2")
        if f"{value.name}_RetainedState" not in names_out:
            problems.append(f"no output {value.name}_RetainedState")
        if any(n.op_type == "Concat" for n in consumers(value)):
            problems.append(f"{value.name} is still appended to by a Concat")
    if problems:
        raise PostconditionError("retained-state contract broken: " + "; ".join(problems))

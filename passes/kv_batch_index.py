"""Continuous batching on static-shape targets: a ``batch_index`` input selects the KV slots a run reads and writes.

Why: a target with static shapes and the KV cache on the device cannot run one row of its KV buffers
alone, as ONNX Runtime does over a row view. QEfficient's protocol instead keeps ``full_batch_size`` rows of KV state
and gives every run a ``batch_index`` ``[batch, 1]``: a batch-1 prefill names the slot it fills, a decode of all
``full_batch_size`` rows names ``0..full_batch_size-1``.

How (generic, after ``kv-retained-state``): every read of a ``past_*`` input ``P`` ``[full_batch, h, ctx, d]`` now reads
``rows = Gather(P, batch_index, axis=0)`` ``[batch, h, ctx, d]``, so the graph computes exactly as before on the
selected rows (Shape reads included); its ``P_RetainedState`` output becomes ``ScatterND(P, batch_index, updated
rows)``: the selected rows written back, every other slot unchanged. Graph inputs gain ``batch_index``.
"""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes import PostconditionError, PreconditionError

from qgraph import contract
from qgraph.contract import BATCH_INDEX, INPUT_IDS
from qgraph.pass_manager import CountedResult, GraphPass


def _kv_pairs(graph: ir.Graph) -> list[tuple[ir.Value, ir.Value]]:
    """Each retained buffer input with its ``_RetainedState`` output (buffers without one are not state)."""
    return [(p.input, p.output) for p in contract.kv_pairs(graph) if p.output is not None]


class KVBatchIndex(GraphPass):
    """Add ``batch_index``: runs read and write only the KV slots it names (QEfficient's continuous batching)."""

    name = "kv-batch-index"
    summary = "continuous batching on static shapes: batch_index input selects the KV slots a run reads and writes"

    def requires(self, model: ir.Model) -> None:
        if not _kv_pairs(model.graph):
            raise PreconditionError(
                f"needs the retained-state graph ({contract.RETAINED_INPUT_PATTERN} inputs with "
                f"{contract.RETAINED_SUFFIX} outputs)"
            )

    def call(self, model: ir.Model) -> CountedResult:
        graph = model.graph
        if any(v.name == BATCH_INDEX for v in graph.inputs):
            return self.result(model, slots_selected=0)  # already applied
        ids = next(v for v in graph.inputs if v.name == INPUT_IDS)
        batch = ids.shape[0] if ids.shape is not None else "batch"
        batch_index = ir.Value(name=BATCH_INDEX, shape=ir.Shape([batch, 1]), type=ir.TensorType(ir.DataType.INT64))
        graph.inputs.append(batch_index)
        flat = ir.Value(name="kv_batch_index_flat_shape", shape=ir.Shape([1]), type=ir.TensorType(ir.DataType.INT64))
        flat.const_value = ir.tensor([-1], dtype=ir.DataType.INT64, name=flat.name)
        graph.register_initializer(flat)
        reshape = ir.node("Reshape", [batch_index, flat], name="kv_batch_index_flat")
        graph.insert_before(graph.node(0), reshape)
        pairs = _kv_pairs(graph)
        for past, retained in pairs:
            uses = list(past.uses())
            gather = ir.node("Gather", [past, reshape.outputs[0]], {"axis": 0}, name=f"{past.name}_rows")
            graph.insert_after(reshape, gather)
            if past.shape is not None:
                gather.outputs[0].shape = ir.Shape([batch, *list(past.shape.dims)[1:]])
                gather.outputs[0].type = past.type
            for node, index in uses:
                node.replace_input_with(index, gather.outputs[0])
            position = list(graph.outputs).index(retained)
            updated_name = retained.name
            retained.name = f"{updated_name}_rows"
            scatter = ir.node("ScatterND", [past, batch_index, retained], name=f"{updated_name}_write_rows")
            graph.append(scatter)
            written = scatter.outputs[0]
            written.name, written.shape, written.type = updated_name, past.shape, past.type
            graph.outputs[position] = written
        return self.result(model, slots_selected=len(pairs))

    def ensures(self, model: ir.Model) -> None:
        graph = model.graph
        for past, retained in _kv_pairs(graph):
            readers = {n.op_type for n, _ in past.uses()}
            if readers != {"Gather", "ScatterND"} or retained.producer().op_type != "ScatterND":
                raise PostconditionError(f"{past.name} is read by {sorted(readers)}, not only its row Gather/ScatterND")

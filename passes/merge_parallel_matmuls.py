"""Merge MatMuls that read the same activation with constant weights into one MatMul + Split.

Why: Llama-family blocks project the same normed hidden state three times (q, k, v) and the MLP input twice (gate,
up). At batch 1 each projection is a small matrix-vector product whose fixed cost (kernel dispatch, thread-pool
wake-up, reading the activation) is a large part of its time; one product over the concatenated weights pays it once
(what onnxruntime-genai's builder does with ``qkv_proj``). The result is split back along the last axis, so every
consumer sees exactly the tensor it saw before.

Matched: two or more ``MatMul(A, W_i)`` with the same ``A`` and 2-D float initializers ``W_i`` ``[K, N_i]`` of equal
``K``. Run it before ``quantize-weights`` (which then quantizes the merged weight: blocks run along K per output
column, so the quantized values are the same as quantizing each weight alone). Idempotent.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from qgraph.graph_utils import derived_name
from qgraph.pass_manager import CountedResult, GraphPass


def _weight(node: ir.Node) -> np.ndarray | None:
    if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
        return None
    w = node.inputs[1]
    if w is None or w.const_value is None or not w.is_initializer():
        return None
    array = w.const_value.numpy()
    return array if array.ndim == 2 and array.dtype in (np.float32, np.float16) else None


class MergeParallelMatMuls(GraphPass):
    """Sibling MatMuls over one input -> one MatMul over concatenated weights + Split."""

    name = "merge-parallel-matmuls"
    summary = "q/k/v and gate/up projections of one input as one MatMul + Split"

    def call(self, model: ir.Model) -> CountedResult:
        graph = model.graph
        groups = merged = 0
        seen: set[int] = set()
        for node in list(graph):
            if id(node) in seen or _weight(node) is None:
                continue
            a = node.inputs[0]
            siblings = [u.node for u in a.uses() if u.idx == 0 and _weight(u.node) is not None]
            siblings = list({id(n): n for n in siblings}.values())
            weights = [_weight(n) for n in siblings]
            siblings = [n for n, w in zip(siblings, weights, strict=True) if w.shape[0] == weights[0].shape[0]]
            if len(siblings) < 2 or any(w.dtype != weights[0].dtype for w in weights):
                continue
            seen.update(id(n) for n in siblings)
            order = {id(n): i for i, n in enumerate(graph)}
            siblings.sort(key=lambda n: order[id(n)])
            arrays = [_weight(n) for n in siblings]
            name = "_".join(n.inputs[1].name for n in siblings[:1]) + f"_merged{len(siblings)}"
            w = ir.Value(
                name=name,
                shape=ir.Shape([arrays[0].shape[0], sum(x.shape[1] for x in arrays)]),
                type=ir.TensorType(ir.DataType.from_numpy(arrays[0].dtype)),
            )
            w.const_value = ir.tensor(np.concatenate(arrays, axis=1), name=name)
            graph.register_initializer(w)
            sizes = ir.Value(name=f"{name}_sizes", shape=ir.Shape([len(arrays)]), type=ir.TensorType(ir.DataType.INT64))
            sizes.const_value = ir.tensor(np.array([x.shape[1] for x in arrays], np.int64), name=sizes.name)
            graph.register_initializer(sizes)
            first = siblings[0]
            matmul = ir.node("MatMul", [a, w], name=derived_name(first, "merged"))
            split = ir.node("Split", [matmul.outputs[0], sizes], {"axis": -1}, num_outputs=len(siblings))
            split.name = derived_name(first, "split")
            if a.shape is not None:  # shaped like A, the columns of all siblings: later passes read its rank
                matmul.outputs[0].shape = ir.Shape([*a.shape.dims[:-1], w.shape[1]])
            matmul.outputs[0].type = w.type
            graph.insert_before(first, [matmul, split])
            for old, new in zip(siblings, split.outputs, strict=True):
                new.shape, new.type = old.outputs[0].shape, old.outputs[0].type
                ir.convenience.replace_all_uses_with(old.outputs[0], new)
                if old.outputs[0].is_graph_output():
                    index = list(graph.outputs).index(old.outputs[0])
                    new_name = old.outputs[0].name
                    old.outputs[0].name = f"{new_name}_unmerged"
                    new.name = new_name
                    graph.outputs[index] = new
                graph.remove(old, safe=True)
            groups += 1
            merged += len(siblings)
        if groups:
            RemoveUnusedNodesPass()(model)  # the per-projection weights nothing reads now
        return self.result(model, groups=groups, matmuls_merged=merged)

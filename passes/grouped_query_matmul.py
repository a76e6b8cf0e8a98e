"""Grouped-query attention without materialising the repeated K/V heads.

Why: eager GQA (Llama, SmolLM2, Qwen2, Mistral, ...) repeats each K/V head ``n_rep`` times before attention:
``Reshape(Expand(Unsqueeze(kv, 2), [b, kv, n_rep, T, d]), [b, kv * n_rep, T, d])``. On a retained-state graph ``T`` is
ctx_len, so every layer copies ``n_rep`` times its whole K and V cache each step (SmolLM2: 60 copies of 590 KB per
token), only to feed two MatMuls.

How: the query heads are kv-major (head ``h = g * n_rep + r`` reads K/V head ``g``), so folding the ``n_rep`` query
heads of a group into the row dimension gives the same products against the un-repeated cache:

    scores = Q[b, H, s, d] @ K_rep^T      ->  Reshape(Reshape(Q, [b, kv, n_rep*s, d]) @ K^T, [b, H, s, T])
    out    = P[b, H, s, T] @ V_rep        ->  Reshape(Reshape(P, [b, kv, n_rep*s, T]) @ V,   [b, H, s, d])

(``Reshape`` with 0 = copy that dimension, -1 = infer.) A ``Transpose(perm=[0, 1, 3, 2])`` between the repeat and the
score MatMul moves onto the un-repeated K. Numerically identical; graph inputs/outputs unchanged. Idempotent (no
repeat left to match).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from qgraph.graph_utils import const_ints, derived_name, static_dim
from qgraph.pass_manager import CountedResult, GraphPass


def _int64(graph: ir.Graph, name: str, values: list[int]) -> ir.Value:
    if name in graph.initializers:
        return graph.initializers[name]
    value = ir.Value(name=name, shape=ir.Shape([len(values)]), type=ir.TensorType(ir.DataType.INT64))
    value.const_value = ir.tensor(np.array(values, dtype=np.int64), name=name)
    graph.register_initializer(value)
    return value


class GroupedQueryMatMul(GraphPass):
    """Attention MatMuls against un-repeated K/V heads (no per-step copy of the cache ``n_rep`` times)."""

    name = "grouped-query-matmul"
    summary = "GQA: fold query-head groups into rows instead of repeating K/V heads (Expand) before attention"

    def _repeat(self, reshape: ir.Node) -> tuple[ir.Value, int, int] | None:
        """(un-repeated kv [b, kv, T, d], kv heads, n_rep) when ``reshape`` ends an Unsqueeze/Expand head repeat."""
        if reshape.op_type != "Reshape" or reshape.domain not in ("", "ai.onnx"):
            return None
        expand = reshape.inputs[0].producer()
        if expand is None or expand.op_type != "Expand":
            return None
        unsqueeze = expand.inputs[0].producer()
        if unsqueeze is None or unsqueeze.op_type != "Unsqueeze":
            return None
        axes = const_ints(unsqueeze.inputs[1]) if len(unsqueeze.inputs) > 1 else None
        if axes != [2]:
            return None
        kv = unsqueeze.inputs[0]
        out_shape = reshape.outputs[0].shape
        if kv.shape is None or out_shape is None or len(kv.shape) != 4 or len(out_shape) != 4:
            return None
        kv_heads, heads = static_dim(kv.shape, 1), static_dim(out_shape, 1)
        if not kv_heads or not heads or heads % kv_heads or heads == kv_heads:
            return None
        return kv, kv_heads, heads // kv_heads

    def call(self, model: ir.Model) -> CountedResult:
        graph = model.graph
        rewritten = repeats_removed = 0
        for reshape in list(graph):
            found = self._repeat(reshape)
            if found is None:
                continue
            kv, kv_heads, n_rep = found
            heads = kv_heads * n_rep
            repeated = reshape.outputs[0]
            # every reader must be a MatMul (as B), directly or through the K transpose
            targets: list[tuple[ir.Node, ir.Node | None]] = []
            for use in list(repeated.uses()):
                node = use.node
                if node.op_type == "MatMul" and use.idx == 1:
                    targets.append((node, None))
                elif node.op_type == "Transpose" and list(node.attributes["perm"].value) == [0, 1, 3, 2]:
                    readers = list(node.outputs[0].uses())
                    if not readers or any(u.node.op_type != "MatMul" or u.idx != 1 for u in readers):
                        targets = []
                        break
                    targets += [(u.node, node) for u in readers]
                else:
                    targets = []
                    break
            if not targets or repeated.is_graph_output():
                continue
            grouped = _int64(graph, f"gqm_grouped_{kv_heads}", [0, kv_heads, -1, 0])
            ungrouped = _int64(graph, f"gqm_ungrouped_{heads}", [0, heads, -1, 0])
            transposed: dict[int, ir.Value] = {}
            for matmul, transpose in targets:
                b = kv
                if transpose is not None:
                    if id(transpose) not in transposed:
                        t = ir.node("Transpose", [kv], {"perm": [0, 1, 3, 2]}, name=derived_name(transpose, "grouped"))
                        graph.insert_before(matmul, [t])
                        transposed[id(transpose)] = t.outputs[0]
                    b = transposed[id(transpose)]
                a_grouped = ir.node("Reshape", [matmul.inputs[0], grouped], name=derived_name(matmul, "group_rows"))
                product = ir.node("MatMul", [a_grouped.outputs[0], b], name=derived_name(matmul, "grouped"))
                back = ir.node("Reshape", [product.outputs[0], ungrouped], name=derived_name(matmul, "ungroup_rows"))
                back.outputs[0].shape = matmul.outputs[0].shape
                back.outputs[0].type = matmul.outputs[0].type
                ir.convenience.replace_nodes_and_values(
                    graph, matmul, [matmul], [a_grouped, product, back], matmul.outputs, back.outputs
                )
                rewritten += 1
            repeats_removed += 1
        if rewritten:
            RemoveUnusedNodesPass()(model)  # the K/V repeat chains nothing reads now
        return self.result(model, matmuls_grouped=rewritten, kv_repeats_removed=repeats_removed)

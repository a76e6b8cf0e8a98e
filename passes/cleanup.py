"""Graph cleanup: constant folding, dead code, common subexpressions, duplicate initializers, shape inference, order.

Everything here is what onnxscript / onnx_ir already do well; this pass runs them in one step and reports counts
like every other qgraph pass. Shape inference only fills in what is unknown (values a rewrite created without a
type or shape); it never replaces a shape the graph already states (the exporter's symbolic dimension names stay).
"""

from __future__ import annotations

import onnx_ir as ir
import onnxscript.optimizer
from onnx_ir.passes import common

from qgraph.pass_manager import CountedResult, GraphPass


def _typed_values(model: ir.Model) -> dict[ir.Value, tuple]:
    """Every value of the main graph with the type and shape it states now."""
    graph = model.graph
    values = [*graph.inputs, *graph.initializers.values(), *(out for node in graph for out in node.outputs)]
    return {v: (v.type, v.shape) for v in values}


def fill_unknown_shapes(model: ir.Model) -> int:
    """ONNX shape inference (onnx_ir's pass, safe for models over 2 GB), kept only where nothing was known.

    Returns how many values gained a type or a shape.
    """
    before = _typed_values(model)
    # data_prop off: onnx's data propagation expands 1-D tensors element by element (10 GB of memory for a model with
    # a 200 MB vector initializer) and only refines shapes the exporter already states
    common.ShapeInferencePass(check_type=False, strict_mode=False, data_prop=False)(model)
    filled = 0
    for value, (old_type, old_shape) in before.items():
        if old_type is not None:
            value.type = old_type
        if old_shape is not None:
            value.shape = old_shape
        filled += (old_type is None and value.type is not None) or (old_shape is None and value.shape is not None)
    return filled


class Cleanup(GraphPass):
    name = "cleanup"
    summary = "constant folding, dead code, CSE, duplicate initializers, shape inference, topological sort"

    def __init__(self, fold_constants: bool = True, infer_shapes: bool = True):
        self.fold_constants = fold_constants
        self.infer_shapes = infer_shapes

    def call(self, model: ir.Model) -> CountedResult:
        nodes_before = model.graph.num_nodes()
        inits_before = len(model.graph.initializers)
        functions_before = len(model.functions)
        if self.fold_constants:
            onnxscript.optimizer.fold_constants(model, onnx_shape_inference=False)
        for p in (
            common.RemoveUnusedNodesPass(),
            common.IdentityEliminationPass(),
            common.CommonSubexpressionEliminationPass(),
            common.DeduplicateInitializersPass(),
            common.RemoveUnusedNodesPass(),
            common.RemoveUnusedFunctionsPass(),
            common.RemoveUnusedOpsetsPass(),
            common.TopologicalSortPass(),
        ):
            p(model)
        shapes = fill_unknown_shapes(model) if self.infer_shapes else 0
        return self.result(
            model,
            nodes_removed=nodes_before - model.graph.num_nodes(),
            initializers_removed=inits_before - len(model.graph.initializers),
            functions_removed=functions_before - len(model.functions),
            shapes_inferred=shapes,
        )

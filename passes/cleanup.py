"""Graph cleanup: constant folding, dead code, common subexpressions, duplicate initializers, topological order.

Everything here is what onnxscript / onnx_ir already do well; this pass runs them in one step and reports counts
like every other qgraph pass.
"""

from __future__ import annotations

import onnx_ir as ir
import onnxscript.optimizer
from onnx_ir.passes import common

from qgraph.pass_manager import CountedResult, GraphPass


class Cleanup(GraphPass):
    name = "cleanup"
    summary = "constant folding, dead-code removal, CSE, duplicate-initializer removal, topological sort"

    def __init__(self, fold_constants: bool = True):
        self.fold_constants = fold_constants

    def call(self, model: ir.Model) -> CountedResult:
        nodes_before = model.graph.num_nodes()
        inits_before = len(model.graph.initializers)
        if self.fold_constants:
            onnxscript.optimizer.fold_constants(model, onnx_shape_inference=False)
        for p in (
            common.RemoveUnusedNodesPass(),
            common.CommonSubexpressionEliminationPass(),
            common.DeduplicateInitializersPass(),
            common.RemoveUnusedNodesPass(),
            common.RemoveUnusedFunctionsPass(),
            common.RemoveUnusedOpsetsPass(),
            common.TopologicalSortPass(),
        ):
            p(model)
        return self.result(
            model,
            nodes_removed=nodes_before - model.graph.num_nodes(),
            initializers_removed=inits_before - len(model.graph.initializers),
        )

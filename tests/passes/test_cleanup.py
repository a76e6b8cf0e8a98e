"""cleanup: folds constants, removes dead code, duplicate subexpressions and initializers, fills unknown shapes, sorts;
a clean graph is left alone; outputs stay equal on ORT; idempotent."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qgraph.pass_manager import op_histogram
from qgraph.passes.cleanup import Cleanup
from qgraph.verify import max_abs_diff_on_ort
from tests.passes.conftest import copy, parse, run_twice

C = np.arange(4, dtype=np.float32)
MESSY = """
    <ir_version: 10, opset_import: ["" : 20]>
    g (float[2,4] x) => (float[2,4] y) {
        xi = Identity(x)
        a1 = Add(xi, c1)
        a2 = Add(xi, c1)
        b = Mul(a1, a2)
        folded = Add(c2, c3)
        y = Add(b, folded)
        unused = Neg(x)
    }"""


def test_messy_graph_is_cleaned_with_equal_outputs():
    model = parse(MESSY, c1=C, c2=C, c3=C + 1)  # c1 and c2 hold equal data
    before = copy(model)
    result = run_twice(Cleanup(), model)
    counts = result.counts
    assert counts["nodes_removed"] >= 3  # Identity, the duplicate Add, Neg, the folded Add
    assert counts["initializers_removed"] >= 1 and counts["shapes_inferred"] >= 1
    assert op_histogram(model) == {"Add": 2, "Mul": 1}
    assert all(o.shape is not None and o.dtype is not None for n in model.graph for o in n.outputs)
    assert max_abs_diff_on_ort(before, model) == 0.0


def test_a_clean_graph_is_left_alone():
    model = parse(
        """
        <ir_version: 10, opset_import: ["" : 20]>
        g (float[2,4] x) => (float[2,4] y) { y = Relu(x) }"""
    )
    result = Cleanup()(model)
    assert not result.modified and result.counts["nodes_removed"] == 0


def test_known_shapes_are_never_overwritten():
    model = parse(MESSY.replace("float[2,4] x", "float[batch,4] x"), c1=C, c2=C, c3=C)
    Cleanup()(model)
    assert [str(d) for d in model.graph.inputs[0].shape] == ["batch", "4"]


def test_exported_decoder_is_numerically_unchanged(one_layer_model):
    model = one_layer_model("llama")
    before = copy(model)
    run_twice(Cleanup(), model)
    assert max_abs_diff_on_ort(before, model) < 1e-6
    assert isinstance(model.graph.inputs[0].shape, ir.Shape)

"""fp16-clip: float32 constants beyond +-65504 are clipped (integers untouched), additive "minus infinity" masks become
selects so a float16 graph computes no NaN; other graphs are left alone with a reason; idempotent."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from qgraph.pass_manager import op_histogram
from qgraph.passes.fp16_clip import FP16Clip
from qgraph.passes.fp16_convert import FP16Convert
from qgraph.verify import max_abs_diff_on_ort, run_on_ort
from tests.passes.conftest import N_LAYERS, copy, parse, run_twice

F16_MAX = 65504.0
VALUES = np.array([F16_MAX, -F16_MAX, 1e10, -1e10, -np.inf, np.inf, 1.0, np.nan], np.float32)
CLIPPED = np.array([F16_MAX, -F16_MAX, F16_MAX, -F16_MAX, -F16_MAX, F16_MAX, 1.0, np.nan], np.float32)


def _constants_model() -> ir.Model:
    """Float32 constants in every place they live: initializer, Constant tensor / value_float, ConstantOfShape."""
    nodes = [
        helper.make_node("Add", ["x", "big"], ["y"]),
        helper.make_node("Identity", ["ints"], ["ints_out"]),
        helper.make_node("Constant", [], ["c"], value_float=-1e10),
        helper.make_node("Add", ["x", "c"], ["z"]),
        helper.make_node("Constant", [], ["shape"], value=helper.make_tensor("s", TensorProto.INT64, [1], [8])),
        helper.make_node(
            "ConstantOfShape", ["shape"], ["fill"], value=helper.make_tensor("v", TensorProto.FLOAT, [1], [-np.inf])
        ),
        helper.make_node("Constant", [], ["t"], value=helper.make_tensor("t", TensorProto.FLOAT, [8], VALUES)),
        helper.make_node("Add", ["fill", "t"], ["w"]),
    ]
    graph = helper.make_graph(
        nodes,
        "constants",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8])],
        [
            helper.make_tensor_value_info(name, dtype, [8] if name != "ints_out" else [3])
            for name, dtype in (("y", 1), ("ints_out", 7), ("z", 1), ("w", 1))
        ],
        [
            onnx.numpy_helper.from_array(VALUES, "big"),
            onnx.numpy_helper.from_array(np.array([100000, -100000, 7], np.int64), "ints"),
        ],
    )
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]))


def test_float32_constants_are_clipped_to_the_float16_range_and_integers_are_untouched():
    model = _constants_model()
    result = run_twice(FP16Clip(), model)
    # big: 1e10, -1e10, -inf, inf; the value_float -1e10; ConstantOfShape's -inf; the Constant tensor's four
    assert result.counts == {"masks_selected": 0, "tensors_clipped": 4, "values_clipped": 10}
    np.testing.assert_array_equal(model.graph.initializers["big"].const_value.numpy(), CLIPPED)
    np.testing.assert_array_equal(model.graph.initializers["ints"].const_value.numpy(), [100000, -100000, 7])
    out = run_on_ort(model, {"x": np.zeros(8, np.float32)})
    np.testing.assert_array_equal(out["y"], CLIPPED)
    np.testing.assert_array_equal(out["z"], np.full(8, -F16_MAX, np.float32))
    np.testing.assert_array_equal(out["ints_out"], [100000, -100000, 7])
    np.testing.assert_array_equal(out["w"], np.full(8, -F16_MAX) + CLIPPED)


MASKED_SOFTMAX = """
    <ir_version: 10, opset_import: ["" : 20]>
    g (float[1,1,3,4] scores, bool[1,1,3,4] visible) => (float[1,1,3,4] probs) {
        zero = Constant<value = float {0.0}>()
        neg = Constant<value = float {NEG}>()
        mask = Where(visible, zero, neg)
        masked = Add(scores, mask)
        probs = Softmax(masked)
    }"""
VISIBLE = np.array([[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0]], bool)[None, None]  # last row: a padding query
SCORES = np.full((1, 1, 3, 4), -100.0, np.float32)  # low scores: scores + (-65504) overflows float16


def _float16_arithmetic(model: ir.Model, feeds: dict) -> np.ndarray:
    """Outputs computed with true float16 arithmetic in every node (onnx's numpy reference evaluator), as a float16
    target does; ONNX Runtime on the CPU would compute runs of float16 nodes in float32 and hide an overflow."""
    from onnx.reference import ReferenceEvaluator

    [probs] = ReferenceEvaluator(ir.to_proto(model)).run(None, feeds)
    return probs


def test_additive_minus_infinity_mask_becomes_a_select_and_float16_computes_no_nan():
    feeds = {"scores": SCORES, "visible": VISIBLE}
    reference = run_on_ort(parse(MASKED_SOFTMAX.replace("NEG", "-3.4e38")), feeds)["probs"]

    naive = parse(MASKED_SOFTMAX.replace("NEG", "-3.4e38"))
    FP16Convert()(naive)  # float16 without clipping: the mask saturates to -65504, scores + mask to -inf
    with np.errstate(all="ignore"):
        assert np.isnan(_float16_arithmetic(naive, {"scores": SCORES.astype(np.float16), "visible": VISIBLE})).any()

    model = parse(MASKED_SOFTMAX.replace("NEG", "-3.4e38"))
    result = run_twice(FP16Clip(), model)
    assert result.counts["masks_selected"] == 1
    assert op_histogram(model)["Add"] == 0 and op_histogram(model)["Where"] == 1
    np.testing.assert_allclose(run_on_ort(model, feeds)["probs"], reference, atol=1e-6)
    FP16Convert()(model)
    for probs in (
        run_on_ort(model, feeds)["probs"],
        _float16_arithmetic(model, {**feeds, "scores": SCORES.astype(np.float16)}),
    ):
        assert np.isfinite(probs).all()
        np.testing.assert_allclose(probs.astype(np.float32), reference, atol=1e-3)  # padding row: uniform, as in fp32


@pytest.mark.parametrize("neg", ["-1e10", "-inf"])
def test_every_spelling_of_minus_infinity_is_a_mask(neg):
    feeds = {"scores": SCORES, "visible": VISIBLE}
    if neg == "-inf":  # an additive -inf mask is NaN for a padding row even in float32
        with np.errstate(all="ignore"):
            assert np.isnan(run_on_ort(parse(MASKED_SOFTMAX.replace("NEG", neg)), feeds)["probs"]).any()
    model = parse(MASKED_SOFTMAX.replace("NEG", neg))
    assert FP16Clip()(model).counts["masks_selected"] == 1
    FP16Convert()(model)
    assert np.isfinite(run_on_ort(model, feeds)["probs"]).all()
    assert np.isfinite(_float16_arithmetic(model, {**feeds, "scores": SCORES.astype(np.float16)})).all()


def test_a_finite_bias_is_not_a_mask_and_the_pass_says_why():
    model = parse(MASKED_SOFTMAX.replace("NEG", "-100.0"))
    hist = op_histogram(model)
    graph_pass = FP16Clip()
    assert not graph_pass(model).modified and op_histogram(model) == hist
    assert any("minus infinity" in miss for miss in graph_pass.near_misses), graph_pass.near_misses


def test_retained_state_decoder_masks_become_selects_with_equal_outputs(retained_model, one_layer_model):
    model = retained_model("llama")
    result = run_twice(FP16Clip(), model)
    assert result.counts["masks_selected"] == N_LAYERS  # one masked Add before each layer's Softmax
    model = one_layer_model("llama", retained=True)
    before = copy(model)
    assert run_twice(FP16Clip(), model).counts["masks_selected"] == 1
    assert max_abs_diff_on_ort(before, model) < 1e-6

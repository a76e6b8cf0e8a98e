"""rmsnorm-fuse: every decomposed RMSNorm variant becomes one op, lowered per backend; other graphs are left alone
with a reason; outputs stay equal on ORT; the pass is idempotent."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from qgraph.backends.ai100_rmsnorm import CUSTOM_RMSNORM
from qgraph.pass_manager import PassSpec, op_histogram, run_pipeline
from qgraph.passes.rmsnorm import RMSNormFusion
from qgraph.verify import max_abs_diff_on_ort
from tests.passes.conftest import N_LAYERS, copy, parse, run_twice

AI100_DOMAIN, AI100_FUNCTION = CUSTOM_RMSNORM.op  # the function lowering a backend offers (Cloud AI 100's)


def lowered(name: str):
    """The pass's ``lowering`` for a test parameter: ``"function"`` is the backend's FunctionLowering."""
    return CUSTOM_RMSNORM if name == "function" else name


HEADER = '<ir_version: 10, opset_import: ["" : 20]>'
W = np.linspace(0.5, 1.5, 8).astype(np.float32)
CHAIN_OPS = {"Pow", "ReduceMean", "Sqrt", "Reciprocal", "Div"}

# The variants exporters and models produce. Each graph holds exactly one RMSNorm of x over its last axis.
VARIANTS = {
    "dynamo (Pow, Reciprocal, weight first)": """
        two = Constant<value = float {2.0}>()
        sq = Pow(x, two)
        axes = Constant<value = int64[1] {-1}>()
        mean = ReduceMean<keepdims = 1>(sq, axes)
        eps = Constant<value = float {1e-6}>()
        var = Add(mean, eps)
        std = Sqrt(var)
        inv = Reciprocal(std)
        n = Mul(x, inv)
        y = Mul(w, n)""",
    "torchscript (Cast, Div(1, sqrt), Cast back)": """
        xc = Cast<to = 1>(x16)
        two = Constant<value = float {2.0}>()
        sq = Pow(xc, two)
        axes = Constant<value = int64[1] {-1}>()
        mean = ReduceMean<keepdims = 1>(sq, axes)
        eps = Constant<value = float {1e-5}>()
        var = Add(mean, eps)
        std = Sqrt(var)
        one = Constant<value = float {1.0}>()
        inv = Div(one, std)
        n32 = Mul(xc, inv)
        n = Cast<to = 10>(n32)
        y = Mul(n, w16)""",
    "Mul(x, x), Pow(var, -0.5), inverse first, weight after": """
        sq = Mul(x, x)
        axes = Constant<value = int64[1] {2}>()
        mean = ReduceMean(sq, axes)
        eps = Constant<value = float {1e-6}>()
        var = Add(eps, mean)
        half = Constant<value = float {-0.5}>()
        inv = Pow(var, half)
        n = Mul(inv, x)
        y = Mul(n, w)""",
    "x / sqrt(var)": """
        two = Constant<value = float {2.0}>()
        sq = Pow(x, two)
        axes = Constant<value = int64[1] {-1}>()
        mean = ReduceMean<keepdims = 1>(sq, axes)
        eps = Constant<value = float {1e-6}>()
        var = Add(mean, eps)
        std = Sqrt(var)
        n = Div(x, std)
        y = Mul(n, w)""",
    "Gemma (1 + weight)": """
        two = Constant<value = float {2.0}>()
        sq = Pow(x, two)
        axes = Constant<value = int64[1] {-1}>()
        mean = ReduceMean<keepdims = 1>(sq, axes)
        eps = Constant<value = float {1e-6}>()
        var = Add(mean, eps)
        std = Sqrt(var)
        inv = Reciprocal(std)
        n = Mul(x, inv)
        one = Constant<value = float {1.0}>()
        scale = Add(one, w)
        y = Mul(n, scale)""",
    "no weight": """
        two = Constant<value = float {2.0}>()
        sq = Pow(x, two)
        axes = Constant<value = int64[1] {-1}>()
        mean = ReduceMean<keepdims = 1>(sq, axes)
        eps = Constant<value = float {1e-6}>()
        var = Add(mean, eps)
        std = Sqrt(var)
        inv = Reciprocal(std)
        y = Mul(x, inv)""",
}


def _norm(exponent: str = "2.0", axis: str = "-1", square: str = "Pow(x, p)") -> str:
    """A weighted RMSNorm body with the exponent, reduced axis and square spelled as given."""
    return f"""
        p = Constant<value = float {{{exponent}}}>()
        sq = {square}
        axes = Constant<value = int64[1] {{{axis}}}>()
        mean = ReduceMean<keepdims = 1>(sq, axes)
        eps = Constant<value = float {{1e-6}}>()
        var = Add(mean, eps)
        std = Sqrt(var)
        inv = Reciprocal(std)
        n = Mul(x, inv)"""


def _variant(body: str) -> ir.Model:
    if "x16" in body:
        signature = "g (float16[2,3,8] x16) => (float16[2,3,8] y)"
        return parse(f"{HEADER}\n{signature} {{ {body} }}", w16=W.astype(np.float16))
    return parse(f"{HEADER}\ng (float[2,3,8] x) => (float[2,3,8] y) {{ {body} }}", w=W)


def _reference(x: np.ndarray, name: str) -> np.ndarray:
    body = VARIANTS[name]
    x = x.astype(np.float64)
    normed = x / np.sqrt((x**2).mean(-1, keepdims=True) + (1e-5 if "x16" in body else 1e-6))
    if name == "no weight":
        return normed
    return normed * (1 + W if name.startswith("Gemma") else W)


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("lowering", ["ort-fused", "function", "onnx-23"])
def test_every_variant_fuses_to_one_op_with_equal_outputs(name, lowering):
    model = _variant(VARIANTS[name])
    before = copy(model)
    result = run_twice(RMSNormFusion(lowered(lowering)), model)
    assert result.counts["fused"] == 1
    hist = op_histogram(model)
    target = {
        "ort-fused": "SimplifiedLayerNormalization",
        "function": f"{AI100_DOMAIN}::{AI100_FUNCTION}",
        "onnx-23": "RMSNormalization",
    }[lowering]
    assert hist[target] == 1
    if lowering != "function":  # the function body is a decomposed RMSNorm by design
        assert not CHAIN_OPS & set(hist), hist
    tolerance = 2e-3 if "x16" in VARIANTS[name] else 1e-5
    assert max_abs_diff_on_ort(before, model) < tolerance
    x = np.random.default_rng(0).standard_normal((2, 3, 8)).astype(np.float32)
    from qgraph.verify import run_on_ort

    feeds = {v.name: x for v in model.graph.inputs}
    [y] = run_on_ort(model, feeds).values()
    np.testing.assert_allclose(y.astype(np.float64), _reference(x, name), atol=tolerance, rtol=tolerance)


def test_custom_rmsnorm_is_a_model_local_function_with_an_epsilon_attribute():
    model = _variant(VARIANTS["dynamo (Pow, Reciprocal, weight first)"])
    RMSNormFusion(CUSTOM_RMSNORM)(model)
    [node] = [n for n in model.graph if n.op_type == AI100_FUNCTION]
    assert node.domain == AI100_DOMAIN and node.attributes["epsilon"].as_float() == pytest.approx(1e-6)
    assert model.opset_imports[AI100_DOMAIN] == 1
    function = model.functions[(AI100_DOMAIN, AI100_FUNCTION, "")]
    assert {n.domain for n in function} == {""}, "the body is standard ONNX, so any runtime can inline it"
    assert [a.name for a in function.attributes.values()] == ["epsilon"]


NOT_NORMS = {
    "LayerNorm (mean subtracted)": (
        """
        axes = Constant<value = int64[1] {-1}>()
        mu = ReduceMean(x, axes)
        d = Sub(x, mu)
        two = Constant<value = float {2.0}>()
        sq = Pow(d, two)
        mean = ReduceMean(sq, axes)
        eps = Constant<value = float {1e-6}>()
        var = Add(mean, eps)
        std = Sqrt(var)
        inv = Reciprocal(std)
        n = Mul(d, inv)
        y = Mul(w, n)""",
        "this is a LayerNorm",
    ),
    "cube instead of square": (_norm(exponent="3.0") + "\n        y = Mul(w, n)", "not Pow(x, 2)"),
    "mean over another axis": (_norm(axis="1") + "\n        y = Mul(w, n)", "not the last axis"),
}


@pytest.mark.parametrize("name", NOT_NORMS)
def test_what_is_not_an_rmsnorm_is_left_alone_and_the_pass_says_why(name):
    body, reason = NOT_NORMS[name]
    model = _variant(body)
    hist = op_histogram(model)
    graph_pass = RMSNormFusion()
    result = graph_pass(model)
    assert result.counts["fused"] == 0 and op_histogram(model) == hist
    if reason is None:
        assert not graph_pass.near_misses
    else:
        assert any(reason in miss for miss in graph_pass.near_misses), graph_pass.near_misses


def test_a_norm_scaled_by_an_activation_fuses_without_the_activation():
    model = _variant(_norm() + "\n        gate = Sigmoid(x)\n        y = Mul(n, gate)")
    before = copy(model)
    assert RMSNormFusion()(model).counts["fused"] == 1
    hist = op_histogram(model)
    assert hist["SimplifiedLayerNormalization"] == 1 and hist["Mul"] == 1 and hist["Sigmoid"] == 1
    assert max_abs_diff_on_ort(before, model) < 1e-5


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gemma"])
def test_every_norm_of_an_exported_decoder_fuses(vanilla_model, arch):
    model = vanilla_model(arch)
    before = copy(model)
    [report] = run_pipeline(model, [PassSpec("rmsnorm-fuse")], verify=max_abs_diff_on_ort)
    assert report.counts["fused"] == 2 * N_LAYERS + 1
    hist = op_histogram(model)
    assert hist["SimplifiedLayerNormalization"] == 2 * N_LAYERS + 1
    assert not {"Pow", "ReduceMean", "Sqrt", "Reciprocal"} & set(hist), hist
    assert report.max_abs_diff < 1e-4
    assert max_abs_diff_on_ort(before, model, seed=1) < 1e-4


@pytest.mark.parametrize("lowering", ["ort-fused", "function"])
def test_every_norm_of_a_torchscript_export_fuses(torchscript_model, lowering):
    """Cast to float32 around each norm, Div(1, sqrt), ReduceMean axes as an attribute (opset 17), untyped values."""
    model = torchscript_model("llama", 17)
    before = copy(model)
    graph_pass = RMSNormFusion(lowered(lowering))
    assert run_twice(graph_pass, model).counts["fused"] == 2 * N_LAYERS + 1
    assert not {"Pow", "ReduceMean"} & {n.op_type for n in model.graph}, graph_pass.near_misses
    assert max_abs_diff_on_ort(before, model) < 1e-4


def test_a_fused_graph_is_relowered_for_another_backend(vanilla_model):
    model = vanilla_model("llama")
    before = copy(model)
    RMSNormFusion("ort-fused")(model)
    result = run_twice(RMSNormFusion(CUSTOM_RMSNORM), model)
    assert result.counts == {"fused": 0, "converted": 2 * N_LAYERS + 1}
    hist = op_histogram(model)
    assert hist[f"{AI100_DOMAIN}::{AI100_FUNCTION}"] == 2 * N_LAYERS + 1 and not hist["SimplifiedLayerNormalization"]
    assert max_abs_diff_on_ort(before, model) < 1e-4
    result = RMSNormFusion("decomposed")(model)  # and back to standard ops for a target without a fused norm
    assert result.counts["decomposed"] == 2 * N_LAYERS + 1 and AI100_FUNCTION not in str(op_histogram(model))
    assert not model.functions and AI100_DOMAIN not in model.opset_imports
    assert max_abs_diff_on_ort(before, model) < 1e-4


@pytest.mark.parametrize("lowering", ["ort-fused", "function", "onnx-23"])
def test_one_layer_decoder_is_numerically_unchanged(one_layer_model, lowering):
    model = one_layer_model("llama")
    before = copy(model)
    assert run_twice(RMSNormFusion(lowered(lowering)), model).counts["fused"] == 3  # two norms in the layer, one final
    assert max_abs_diff_on_ort(before, model) < 1e-4


def test_idempotent_on_an_exported_decoder(vanilla_model):
    model = vanilla_model("llama")
    assert run_twice(RMSNormFusion(), model).counts["fused"] == 2 * N_LAYERS + 1


def test_unknown_lowering_is_refused():
    with pytest.raises(ValueError, match="lowering must be one of"):
        RMSNormFusion("magic")

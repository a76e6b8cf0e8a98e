"""layernorm-gelu: decomposed LayerNorm becomes LayerNormalization and every Gelu spelling one Gelu op, whatever the
exporter wrote; other graphs are left alone with a reason; outputs stay equal on ORT; the pass is idempotent."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from qgraph.pass_manager import op_histogram
from qgraph.passes.norm_gelu import LayerNormGelu
from qgraph.verify import max_abs_diff_on_ort
from tests.passes.conftest import N_LAYERS, copy, parse, run_twice

HEADER = '<ir_version: 10, opset_import: ["" : 20]>'
SIGNATURE = "g (float[2,3,8] x) => (float[2,3,8] y)"
TANH_CONSTANTS = """
        half = Constant<value = float {0.5}>()
        one = Constant<value = float {1.0}>()
        three = Constant<value = float {3.0}>()
        cubic = Constant<value = float {0.044715}>()
        k = Constant<value = float {0.7978845608}>()"""
ERF_CONSTANTS = """
        half = Constant<value = float {0.5}>()
        one = Constant<value = float {1.0}>()
        two = Constant<value = float {2.0}>()
        root2 = Constant<value = float {1.4142135}>()
        inv_root2 = Constant<value = float {0.70710678}>()"""

GELUS = {  # name -> (form, body)
    "GPT-2 NewGELU as dynamo writes it: (0.5 x)(1 + tanh(k (x + c x^3)))": (
        "tanh",
        TANH_CONSTANTS
        + """
        h = Mul(x, half)
        p = Pow(x, three)
        c = Mul(p, cubic)
        i = Add(x, c)
        a = Mul(i, k)
        t = Tanh(a)
        s = Add(t, one)
        y = Mul(h, s)""",
    ),
    "x (0.5 (1 + tanh(k (c x x x + x))))": (
        "tanh",
        TANH_CONSTANTS
        + """
        xx = Mul(x, x)
        xxx = Mul(xx, x)
        c = Mul(cubic, xxx)
        i = Add(c, x)
        a = Mul(k, i)
        t = Tanh(a)
        s = Add(one, t)
        hs = Mul(half, s)
        y = Mul(x, hs)""",
    ),
    "0.5 (x (1 + erf(x / sqrt 2)))": (
        "erf",
        ERF_CONSTANTS
        + """
        d = Div(x, root2)
        e = Erf(d)
        s = Add(e, one)
        xs = Mul(x, s)
        y = Mul(half, xs)""",
    ),
    "x (1 + erf(x * 1/sqrt 2)) / 2": (
        "erf",
        ERF_CONSTANTS
        + """
        d = Mul(x, inv_root2)
        e = Erf(d)
        s = Add(one, e)
        xs = Mul(s, x)
        y = Div(xs, two)""",
    ),
}


def _graph(body: str, **initializers) -> ir.Model:
    return parse(f"{HEADER}\n{SIGNATURE} {{ {body} }}", **initializers)


def _gelu(x: np.ndarray, form: str) -> np.ndarray:
    from math import erf, pi, sqrt

    if form == "tanh":
        return 0.5 * x * (1 + np.tanh(sqrt(2 / pi) * (x + 0.044715 * x**3)))
    return 0.5 * x * (1 + np.vectorize(erf)(x / sqrt(2)))


@pytest.mark.parametrize("name", GELUS)
@pytest.mark.parametrize("target", ["onnx", "com.microsoft"])
def test_every_gelu_spelling_becomes_one_op(name, target):
    form, body = GELUS[name]
    model = _graph(body)
    before = copy(model)
    result = run_twice(LayerNormGelu(target), model)
    assert result.counts["gelu_fused"] == 1
    hist = op_histogram(model)
    fused = {"onnx": "Gelu", "com.microsoft": "com.microsoft::" + ("FastGelu" if form == "tanh" else "Gelu")}[target]
    assert hist[fused] == 1 and not {"Tanh", "Erf", "Pow", "Mul", "Add", "Div"} & set(hist), hist
    assert max_abs_diff_on_ort(before, model) < 1e-5
    from qgraph.verify import run_on_ort

    x = np.linspace(-4, 4, 48, dtype=np.float32).reshape(2, 3, 8)
    [y] = run_on_ort(model, {"x": x}).values()
    np.testing.assert_allclose(y, _gelu(x.astype(np.float64), form), atol=1e-5)


DECOMPOSED_LAYER_NORM = """
        axes = Constant<value = int64[1] {-1}>()
        mu = ReduceMean(x, axes)
        d = Sub(x, mu)
        two = Constant<value = float {2.0}>()
        sq = Pow(d, two)
        var = ReduceMean(sq, axes)
        eps = Constant<value = float {1e-5}>()
        ve = Add(var, eps)
        std = Sqrt(ve)
        n = Div(d, std)
        scaled = Mul(n, {scale})
        y = Add(scaled, b)"""


def test_decomposed_layernorm_becomes_one_layernormalization_with_its_bias():
    rng = np.random.default_rng(0)
    w, b = rng.standard_normal(8).astype(np.float32), rng.standard_normal(8).astype(np.float32)
    model = _graph(DECOMPOSED_LAYER_NORM.replace("{scale}", "w"), w=w, b=b)
    before = copy(model)
    result = run_twice(LayerNormGelu(), model)
    assert result.counts["layernorm_fused"] == 1 and result.counts["bias_folded"] == 1
    [node] = model.graph
    assert node.op_type == "LayerNormalization" and len(node.inputs) == 3
    assert max_abs_diff_on_ort(before, model) < 1e-5


NOT_FUSED = {
    "tanh Gelu with a wrong cubic coefficient": (
        GELUS["GPT-2 NewGELU as dynamo writes it: (0.5 x)(1 + tanh(k (x + c x^3)))"][1].replace("0.044715", "0.05"),
        "cubic coefficient",
    ),
    "quick Gelu x sigmoid(1.702 x) (another function)": (
        """
        k = Constant<value = float {1.702}>()
        kx = Mul(x, k)
        s = Sigmoid(kx)
        y = Mul(x, s)""",
        None,
    ),
    "LayerNorm whose scale is an activation": (
        "gate = Sigmoid(x)" + DECOMPOSED_LAYER_NORM.replace("{scale}", "gate"),
        "not a LayerNorm weight",
    ),
}


@pytest.mark.parametrize("name", NOT_FUSED)
def test_what_is_not_a_gelu_or_layernorm_is_left_alone_and_the_pass_says_why(name):
    body, reason = NOT_FUSED[name]
    model = _graph(body, b=np.zeros(8, np.float32))
    hist = op_histogram(model)
    graph_pass = LayerNormGelu()
    result = graph_pass(model)
    assert not result.modified and op_histogram(model) == hist
    if reason is None:
        assert not graph_pass.near_misses
    else:
        assert any(reason in miss for miss in graph_pass.near_misses), graph_pass.near_misses


@pytest.mark.parametrize("gelu", ["onnx", "com.microsoft"])
def test_one_layer_gpt2_is_numerically_unchanged(one_layer_model, gelu):
    model = one_layer_model("gpt2")
    before = copy(model)
    assert run_twice(LayerNormGelu(gelu), model).counts["gelu_fused"] == 1
    assert op_histogram(model)["LayerNormalization"] == 3
    assert max_abs_diff_on_ort(before, model) < 1e-4


def test_gpt2_dynamo_export_ends_with_one_layernorm_and_one_gelu_per_block(vanilla_model):
    model = vanilla_model("gpt2")
    before = copy(model)
    result = run_twice(LayerNormGelu("onnx"), model)
    assert result.counts["gelu_fused"] == N_LAYERS
    hist = op_histogram(model)
    assert hist["LayerNormalization"] == 2 * N_LAYERS + 1 and hist["Gelu"] == N_LAYERS
    assert not {"Tanh", "Pow", "Erf"} & set(hist)
    assert max_abs_diff_on_ort(before, model) < 1e-4


def test_gpt2_torchscript_export_with_decomposed_layernorm_ends_the_same(torchscript_model):
    model = torchscript_model("gpt2", 20)  # exported at opset 14: LayerNorm and Gelu both decomposed
    assert op_histogram(model)["LayerNormalization"] == 0
    before = copy(model)
    result = run_twice(LayerNormGelu("onnx"), model)
    assert result.counts["layernorm_fused"] == 2 * N_LAYERS + 1 and result.counts["gelu_fused"] == N_LAYERS
    hist = op_histogram(model)
    assert hist["LayerNormalization"] == 2 * N_LAYERS + 1 and hist["Gelu"] == N_LAYERS
    assert not {"Tanh", "Pow", "Sqrt", "ReduceMean"} & set(hist)
    assert max_abs_diff_on_ort(before, model) < 1e-4


def test_fused_gelus_of_the_other_family_are_converted(vanilla_model):
    model = vanilla_model("gpt2")
    before = copy(model)
    LayerNormGelu("onnx")(model)
    result = run_twice(LayerNormGelu("com.microsoft"), model)
    assert result.counts["gelu_converted"] == N_LAYERS
    hist = op_histogram(model)
    assert hist["com.microsoft::FastGelu"] == N_LAYERS and not hist["Gelu"]
    assert max_abs_diff_on_ort(before, model) < 1e-4


def test_onnx_gelu_needs_opset_20():
    model = _graph(GELUS["0.5 (x (1 + erf(x / sqrt 2)))"][1])
    model.opset_imports[""] = 18
    with pytest.raises(ValueError, match="opset >= 20"):
        LayerNormGelu("onnx")(model)
    assert LayerNormGelu("auto")(model).counts["gelu_fused"] == 1  # auto: ORT's contrib Gelu below opset 20
    assert op_histogram(model)["com.microsoft::Gelu"] == 1

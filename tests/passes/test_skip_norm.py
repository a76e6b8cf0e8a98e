"""skip-norm: a residual Add feeding a fused norm becomes one Skip*Normalization that still returns the sum; a norm of
something that is not a residual sum is left alone with a reason; outputs stay equal on ORT; idempotent."""

from __future__ import annotations

import numpy as np
import pytest

from qgraph.pass_manager import PassSpec, op_histogram, run_pipeline
from qgraph.passes.skip_norm import SkipNormFusion
from qgraph.verify import max_abs_diff_on_ort
from tests.passes.conftest import N_LAYERS, copy, parse, run_twice

HEADER = '<ir_version: 10, opset_import: ["" : 20]>'
W = np.linspace(0.5, 1.5, 8).astype(np.float32)
B = np.linspace(-0.2, 0.2, 8).astype(np.float32)

# the sum is also the next residual: the fused node must hand it on (its fourth output)
RESIDUAL_RMS = """
    g (float[2,3,8] a, float[2,3,8] b) => (float[2,3,8] y, float[2,3,8] next) {
        s = Add(a, b)
        n = SimplifiedLayerNormalization<axis = -1, epsilon = 1e-6>(s, w)
        y = Identity(n)
        next = Add(s, n)
    }"""
RESIDUAL_LAYERNORM = """
    g (float[2,3,8] a, float[2,3,8] b) => (float[2,3,8] y, float[2,3,8] next) {
        s = Add(b, a)
        y = LayerNormalization<axis = -1, epsilon = 1e-5>(s, w, bias)
        next = Add(s, y)
    }"""
# a norm of a sum with a broadcast [8] constant is a bias, not a residual: no Skip kernel takes that
NOT_RESIDUAL = """
    g (float[2,3,8] a) => (float[2,3,8] y) {
        s = Add(a, bias)
        y = SimplifiedLayerNormalization<axis = -1, epsilon = 1e-6>(s, w)
    }"""


def test_residual_add_and_rmsnorm_become_one_node_that_returns_the_sum():
    model = parse(HEADER + RESIDUAL_RMS, w=W)
    before = copy(model)
    result = run_twice(SkipNormFusion(), model)
    assert result.counts == {"skip_rmsnorm_fused": 1, "skip_layernorm_fused": 0}
    hist = op_histogram(model)
    assert hist["com.microsoft::SkipSimplifiedLayerNormalization"] == 1
    assert hist["SimplifiedLayerNormalization"] == 0 and hist["Add"] == 1  # only the next residual Add is left
    assert max_abs_diff_on_ort(before, model) < 1e-5


def test_residual_add_and_layernorm_become_one_node():
    model = parse(HEADER + RESIDUAL_LAYERNORM, w=W, bias=B)
    before = copy(model)
    assert run_twice(SkipNormFusion(), model).counts["skip_layernorm_fused"] == 1
    assert op_histogram(model)["com.microsoft::SkipLayerNormalization"] == 1
    assert max_abs_diff_on_ort(before, model) < 1e-5


def test_a_norm_of_a_biased_value_is_not_a_residual_and_the_pass_says_why():
    model = parse(HEADER + NOT_RESIDUAL, w=W, bias=B)
    hist = op_histogram(model)
    graph_pass = SkipNormFusion()
    assert not graph_pass(model).modified
    assert op_histogram(model) == hist
    assert any("does not match expected dimensions" in miss for miss in graph_pass.near_misses), graph_pass.near_misses


# every norm follows a residual Add but Llama's first (it reads the token embeddings); GPT-2's first reads the sum of
# token and position embeddings, a sum all the same
@pytest.mark.parametrize(
    ("arch", "kind", "fused"),
    [("llama", "skip_rmsnorm_fused", 2 * N_LAYERS), ("gpt2", "skip_layernorm_fused", 2 * N_LAYERS + 1)],
)
def test_every_residual_norm_of_a_decoder_fuses_and_outputs_are_unchanged(retained_model, arch, kind, fused):
    model = retained_model(arch)
    norm = "rmsnorm-fuse" if arch == "llama" else "layernorm-gelu"
    run_pipeline(model, [PassSpec(norm)])
    before = copy(model)
    [report] = run_pipeline(model, [PassSpec("skip-norm")])
    assert report.counts[kind] == fused
    assert max_abs_diff_on_ort(before, model) < 1e-4


def test_one_layer_decoder_is_numerically_unchanged_and_idempotent(one_layer_model):
    model = one_layer_model("llama", retained=True)
    run_pipeline(model, [PassSpec("rmsnorm-fuse")])
    before = copy(model)
    assert run_twice(SkipNormFusion(), model).counts["skip_rmsnorm_fused"] == 2
    assert max_abs_diff_on_ort(before, model) < 1e-4

"""qgraph.verify: numeric before/after on ORT (optimizations off, random inputs) as run_pipeline's verify hook."""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from qgraph.pass_manager import GraphPass, PassSpec, run_pipeline
from qgraph.registry import Registry
from qgraph.verify import max_abs_diff_on_ort, random_feeds
from tests.passes.conftest import copy


class ScaleFirstWeight(GraphPass):
    """A deliberately wrong pass: multiplies the first float initializer by 1.5."""

    name = "scale-first-weight"

    def call(self, model):
        value = next(v for v in model.graph.initializers.values() if v.dtype == ir.DataType.FLOAT)
        value.const_value = ir.tensor(value.const_value.numpy() * 1.5, name=value.name)
        return self.result(model, scaled=1)


def test_identical_graphs_differ_by_zero_and_a_changed_weight_is_seen(vanilla_model):
    model = vanilla_model("llama")  # weights in an external data file: the verify copy must still find them
    assert max_abs_diff_on_ort(model, copy(model)) == 0.0
    registry = Registry("pass")
    registry.add("scale-first-weight", ScaleFirstWeight)
    [report] = run_pipeline(model, [PassSpec("scale-first-weight")], registry, verify=max_abs_diff_on_ort)
    assert report.max_abs_diff > 1e-3


def test_feeds_follow_the_decoder_contracts(vanilla_model, retained_model):
    vanilla = random_feeds(vanilla_model("llama"), seq_len=4, past_len=3)
    assert vanilla["attention_mask"].shape == (1, 7) and vanilla["position_ids"].tolist() == [[3, 4, 5, 6]]
    assert vanilla["past_key_values.0.key"].shape[2] == 3
    retained = random_feeds(retained_model("llama"), seq_len=4)
    assert retained["position_ids"].tolist() == [[0, 1, 2, 3]] and "attention_mask" not in retained
    assert retained["input_ids"].max() < 128  # inside the tiny vocabulary


def test_outputs_only_one_graph_has_are_not_compared():
    from tests.passes.conftest import parse

    a = parse('<ir_version: 10, opset_import: ["" : 20]>\ng (float[3] x) => (float[3] y) { y = Relu(x) }')
    b = parse('<ir_version: 10, opset_import: ["" : 20]>\ng (float[3] x) => (float[3] z) { z = Relu(x) }')
    assert math.isinf(max_abs_diff_on_ort(a, b))
    c = parse('<ir_version: 10, opset_import: ["" : 20]>\ng (float[3] x) => (float[3] y) { y = Abs(x) }')
    assert max_abs_diff_on_ort(a, c) == np.abs(np.minimum(random_feeds(a)["x"], 0)).max()

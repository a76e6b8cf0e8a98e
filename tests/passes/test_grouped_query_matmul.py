"""grouped-query-matmul: the K/V head repeat of grouped-query attention disappears, logits are unchanged (within float
rounding), multi-head models are left alone, and the pass is idempotent."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from qgraph.pass_manager import PassSpec, op_histogram, run_pipeline
from qgraph.passes.grouped_query_matmul import GroupedQueryMatMul
from tests.passes.conftest import N_LAYERS, run_twice


def _logits(model: ir.Model, tmp_path, name: str, batch: int = 2) -> np.ndarray:
    path = tmp_path / f"{name}.onnx"
    ir.save(model, path, external_data=f"{name}.onnx.data")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ids = np.array([[5, 9, 17, 33, 41, 2], [7, 8, 9, 0, 0, 0]], np.int64)[:batch]
    pos = np.array([[0, 1, 2, 3, 4, 5], [0, 1, 2, -1, -1, -1]], np.int64)[:batch]
    feeds = {"input_ids": ids, "position_ids": pos}
    for i in session.get_inputs():
        if i.name.startswith("past_"):
            feeds[i.name] = np.random.default_rng(0).normal(size=[batch, *i.shape[1:]]).astype(np.float32)
    return session.run(None, feeds)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_repeats_disappear_and_outputs_are_unchanged(retained_model, tmp_path, arch):
    before = _logits(retained_model(arch), tmp_path, "before")
    model = retained_model(arch)
    expands = op_histogram(model)["Expand"]
    [report] = run_pipeline(model, [PassSpec("grouped-query-matmul")])
    assert report.counts["kv_repeats_removed"] == 2 * N_LAYERS  # K and V of every layer
    assert report.counts["matmuls_grouped"] == 2 * N_LAYERS  # scores and weighted values
    assert op_histogram(model)["Expand"] == expands - 2 * N_LAYERS
    after = _logits(model, tmp_path, "after")
    for x, y in zip(before, after, strict=True):  # logits and every retained-state buffer
        np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-5)


def test_multi_head_attention_is_left_alone(retained_model):
    model = retained_model("gpt2")
    hist = op_histogram(model)
    [report] = run_pipeline(model, [PassSpec("grouped-query-matmul")])
    assert report.counts["kv_repeats_removed"] == 0 and op_histogram(model) == hist


def test_idempotent(retained_model):
    model = retained_model("llama")
    assert run_twice(GroupedQueryMatMul(), model).counts["kv_repeats_removed"] > 0

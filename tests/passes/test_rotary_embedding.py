"""rotary-embedding: every rotate_half RoPE on Q and K becomes one com.microsoft.RotaryEmbedding, outputs stay equal
(padding included), models without RoPE are left alone, and the pass is idempotent."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from qgraph.pass_manager import PassSpec, op_histogram, run_pipeline
from qgraph.passes.rotary_embedding import RotaryEmbeddingFusion
from tests.passes.conftest import N_LAYERS, run_twice


def _outputs(model: ir.Model, tmp_path, name: str) -> list[np.ndarray]:
    path = tmp_path / f"{name}.onnx"
    ir.save(model, path, external_data=f"{name}.onnx.data")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {
        "input_ids": np.array([[5, 9, 17, 33], [7, 8, 0, 0]], np.int64),
        "position_ids": np.array([[20, 21, 22, 23], [3, 4, -1, -1]], np.int64),  # late positions, padding
    }
    for i in session.get_inputs():
        if i.name.startswith("past_"):
            feeds[i.name] = np.random.default_rng(1).normal(size=[2, *i.shape[1:]]).astype(np.float32)
    return session.run(None, feeds)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_rope_fuses_and_outputs_are_unchanged(retained_model, tmp_path, arch):
    before = _outputs(retained_model(arch), tmp_path, "before")
    model = retained_model(arch)
    [report] = run_pipeline(model, [PassSpec("rotary-embedding")])
    assert report.counts["fused"] == 2 * N_LAYERS  # Q and K of every layer
    hist = op_histogram(model)
    assert hist["com.microsoft::RotaryEmbedding"] == 2 * N_LAYERS and hist["Neg"] == 0
    after = _outputs(model, tmp_path, "after")
    np.testing.assert_allclose(after[0][0], before[0][0], rtol=1e-4, atol=1e-4)  # logits of the full row
    np.testing.assert_allclose(after[0][1, :2], before[0][1, :2], rtol=1e-4, atol=1e-4)  # valid part of row 2
    for x, y in zip(before[1:], after[1:], strict=True):  # retained K/V buffers
        np.testing.assert_allclose(y, x, rtol=1e-4, atol=1e-4)


def test_models_without_rope_are_left_alone(retained_model):
    model = retained_model("gpt2")
    hist = op_histogram(model)
    [report] = run_pipeline(model, [PassSpec("rotary-embedding")])
    assert report.counts["fused"] == 0 and op_histogram(model) == hist


def test_idempotent(retained_model):
    model = retained_model("llama")
    assert run_twice(RotaryEmbeddingFusion(), model).counts["fused"] > 0

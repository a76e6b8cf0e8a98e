"""merge-parallel-matmuls: q/k/v and gate/up become one MatMul + Split each, outputs are unchanged, GPT-2 (already
fused c_attn, Gemm) is left alone, quantization afterwards still works, and the pass is idempotent."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from qgraph.pass_manager import PassSpec, op_histogram, run_pipeline
from qgraph.passes.merge_parallel_matmuls import MergeParallelMatMuls
from tests.passes.conftest import N_LAYERS, run_twice


def _outputs(model: ir.Model, tmp_path, name: str) -> list[np.ndarray]:
    path = tmp_path / f"{name}.onnx"
    ir.save(model, path, external_data=f"{name}.onnx.data")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {"input_ids": np.array([[5, 9, 17, 33]], np.int64), "position_ids": np.arange(4)[None].astype(np.int64)}
    for i in session.get_inputs():
        if i.name.startswith("past_"):
            feeds[i.name] = np.zeros([1, *i.shape[1:]], np.float32)
    return session.run(None, feeds)


def test_qkv_and_gate_up_merge_with_identical_outputs(retained_model, tmp_path):
    before = _outputs(retained_model("llama"), tmp_path, "before")
    model = retained_model("llama")
    matmuls = op_histogram(model)["MatMul"]
    [report] = run_pipeline(model, [PassSpec("merge-parallel-matmuls")])
    assert report.counts == {"groups": 2 * N_LAYERS, "matmuls_merged": 5 * N_LAYERS}
    assert op_histogram(model)["MatMul"] == matmuls - 3 * N_LAYERS
    for x, y in zip(before, _outputs(model, tmp_path, "after"), strict=True):
        np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-5)


def test_gpt2_is_left_alone(retained_model):
    model = retained_model("gpt2")
    hist = op_histogram(model)
    [report] = run_pipeline(model, [PassSpec("merge-parallel-matmuls")])
    assert report.counts["groups"] == 0 and op_histogram(model) == hist


def test_quantizing_after_merging_quantizes_the_merged_weights(retained_model):
    model = retained_model("llama")
    run_pipeline(model, [PassSpec("merge-parallel-matmuls")])
    [report] = run_pipeline(model, [PassSpec("quantize-weights", {"bits": 4, "min_elements": 0})])
    assert report.counts["quantized"] == 2 * 4 + 1  # qkv, o, gate_up, down per layer + lm_head


def test_idempotent(retained_model):
    model = retained_model("llama")
    assert run_twice(MergeParallelMatMuls(), model).counts["groups"] > 0

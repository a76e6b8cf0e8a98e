"""group-query-attention: every retained-state attention becomes one com.microsoft.GroupQueryAttention (packed QKV
and rotary absorbed where the graph allows, separate q/k/v otherwise), logits of real tokens are unchanged through a
padded first chunk, a later chunk and decode steps, attention GQA cannot express is left alone, and the pass is
idempotent."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from qgraph.pass_manager import PassSpec, op_histogram, run_pipeline
from qgraph.passes.group_query_attention import GroupQueryAttentionFusion
from tests.passes.conftest import N_LAYERS, run_twice

ORT_PREP = ["grouped-query-matmul", "merge-parallel-matmuls", "shared-head-transpose", "rotary-embedding"]


def _steps(model: ir.Model, tmp_path, name: str) -> list[np.ndarray]:
    """Logits of the real tokens over a generation that keeps the retained state between runs:
    a right-padded first chunk of two rows, two decode steps, then (batch 1) a first chunk and a later chunk."""
    path = tmp_path / f"{name}.onnx"
    ir.save(model, path, external_data=f"{name}.onnx.data")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    states = [i for i in session.get_inputs() if i.name.startswith("past_")]
    got = []

    def run_all(batch: int, runs: list[tuple[list[list[int]], list[list[int]]]]) -> None:
        past = {i.name: np.zeros([batch, *i.shape[1:]], np.float32) for i in states}
        for ids, pos in runs:
            ids, pos = np.array(ids, np.int64), np.array(pos, np.int64)
            logits, *presents = session.run(None, {"input_ids": ids, "position_ids": pos, **past})
            past = {i.name: p for i, p in zip(states, presents, strict=True)}
            got.extend(logits[pos >= 0])  # real tokens only: padding logits are garbage by contract

    run_all(
        2,
        [
            ([[5, 9, 17, 33, 41, 2], [7, 8, 9, 0, 0, 0]], [[0, 1, 2, 3, 4, 5], [0, 1, 2, -1, -1, -1]]),
            ([[11], [12]], [[6], [3]]),
            ([[13], [0]], [[7], [-1]]),  # the second row has finished
        ],
    )
    later = list(range(8, 20))  # past a sliding window of 12 (tests/tiny_models.py)
    run_all(
        1,
        [
            ([[5, 9, 17, 33]], [[0, 1, 2, 3]]),
            ([[41, 2, 7, 0]], [[4, 5, 6, -1]]),
            ([[8]], [[7]]),
            ([[(7 * p) % 100 + 4 for p in later]], [later]),
            ([[10]], [[20]]),
            ([[11]], [[21]]),
        ],
    )
    first = list(range(16))  # a first chunk longer than the window
    run_all(1, [([[(3 * p) % 100 + 4 for p in first]], [first]), ([[12]], [[16]])])
    return got


def _fused(model: ir.Model, prep: list[str]) -> dict[str, int]:
    run_pipeline(model, [PassSpec(p) for p in prep])
    [report] = run_pipeline(model, [PassSpec("group-query-attention")])
    return report.counts


@pytest.mark.parametrize(
    ("arch", "packed", "rotary"),
    # qwen2: q/k/v biases, not merged; mistral: sliding window (GQA's local_window_size)
    [("llama", True, True), ("qwen2", False, True), ("gpt2", True, False), ("mistral", True, True)],
)
def test_attention_fuses_after_the_ort_passes_and_logits_are_unchanged(one_layer_model, tmp_path, arch, packed, rotary):
    model = one_layer_model(arch, retained=True)
    run_pipeline(model, [PassSpec(p) for p in ORT_PREP])
    before = _steps(model, tmp_path, "before")
    splits = op_histogram(model)["Split"]
    [report] = run_pipeline(model, [PassSpec("group-query-attention")])
    layers = 1
    assert report.counts["fused"] == layers
    assert report.counts["packed_qkv"] == (layers if packed else 0)
    assert report.counts["rotary_absorbed"] == (layers if rotary else 0)
    hist = op_histogram(model)
    assert hist["com.microsoft::GroupQueryAttention"] == layers
    for gone in ("Softmax", "ScatterElements", "com.microsoft::RotaryEmbedding"):
        assert hist[gone] == 0, gone
    assert hist["Split"] == splits - (layers if packed else 0)  # GQA reads the packed q/k/v projection itself
    after = _steps(model, tmp_path, "after")
    for x, y in zip(before, after, strict=True):
        np.testing.assert_allclose(y, x, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_separate_q_k_v_and_unfused_rope_are_read_as_rows(one_layer_model, tmp_path, arch):
    """Without the ORT passes before it: q/k/v from their own projections (GPT-2: a Split per part), RoPE as
    exported, K/V heads repeated (llama's grouped heads); GQA reads each part through its projection or a Transpose +
    Reshape and does no rotary itself."""
    model = one_layer_model(arch, retained=True)
    before = _steps(model, tmp_path, "before")
    counts = _fused(model, [])
    assert counts["fused"] == 1 and counts["packed_qkv"] == 0 and counts["rotary_absorbed"] == 0
    assert op_histogram(model)["Softmax"] == 0
    after = _steps(model, tmp_path, "after")
    for x, y in zip(before, after, strict=True):
        np.testing.assert_allclose(y, x, rtol=1e-4, atol=1e-4)


def test_every_layer_of_a_two_layer_model_fuses(retained_model):
    counts = _fused(retained_model("llama"), ORT_PREP)
    assert counts["fused"] == N_LAYERS and counts["softmax_left_unfused"] == 0


@pytest.mark.parametrize("arch", ["gemma2", "bloom"])
def test_attention_gqa_cannot_express_is_left_alone(retained_model, arch):
    """Score softcapping (gemma2) or an ALiBi bias (bloom) is not GQA's causal attention."""
    model = retained_model(arch)
    run_pipeline(model, [PassSpec(p) for p in ORT_PREP])
    hist = op_histogram(model)
    [report] = run_pipeline(model, [PassSpec("group-query-attention")])
    assert report.counts == {"fused": 0, "softmax_left_unfused": hist["Softmax"]}
    assert len(report.misses) == hist["Softmax"] and all(m.startswith("Softmax ") for m in report.misses)
    assert op_histogram(model) == hist


def test_idempotent(retained_model):
    model = retained_model("llama")
    run_pipeline(model, [PassSpec(p) for p in ORT_PREP])
    assert run_twice(GroupQueryAttentionFusion(), model).counts["fused"] == N_LAYERS

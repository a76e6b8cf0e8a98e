"""Token choice: transformers' processors on the same logits, and draws that follow the filtered softmax."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from qgraph.backends.ort import OrtDecoderSession
from qgraph.decoding import GenerationOptions
from qgraph.request import Request
from qgraph.runtime import run_static
from qgraph.sampling import SamplingOptions, apply_repetition_penalty, filtered_logits, sampling_probabilities

KNOWN_LOGITS = np.array([3.0, 2.6, 2.1, 1.7, 1.2, 0.8, 0.3, -0.2, -0.9, -1.5, -2.4, -3.0], dtype=np.float32)


@pytest.mark.parametrize("penalty", [1.3, 0.7])
def test_repetition_penalty_equals_transformers_processor(penalty):
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, size=50).astype(np.float32)
    previous = [3, 7, 7, 11, 3, 42, 0]  # repeats count once, as in transformers
    ours = apply_repetition_penalty(logits, previous, penalty)
    theirs = RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor([previous]), torch.tensor(logits[None]))[0]
    np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-6)
    assert not np.allclose(ours, logits)


@pytest.mark.parametrize(
    "temperature, top_k, top_p, min_p",
    [(0.7, 5, 1.0, None), (1.3, None, 0.8, None), (1.0, None, 1.0, 0.1), (0.5, 8, 0.9, 0.05)],
)
def test_filters_equal_transformers_warpers(temperature, top_k, top_p, min_p):
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 2, size=64).astype(np.float32)
    scores = torch.tensor(logits[None])
    ids = torch.zeros((1, 1), dtype=torch.long)
    warpers = [TemperatureLogitsWarper(temperature)]
    warpers += [TopKLogitsWarper(top_k)] if top_k else []
    warpers += [TopPLogitsWarper(top_p)] if top_p < 1 else []
    warpers += [MinPLogitsWarper(min_p)] if min_p is not None else []
    for warper in warpers:
        scores = warper(ids, scores)
    ours = filtered_logits(logits, temperature, top_k, top_p, min_p)
    theirs = scores[0].numpy()
    assert (np.isinf(ours) == np.isinf(theirs)).all()
    np.testing.assert_allclose(ours[np.isfinite(ours)], theirs[np.isfinite(theirs)], rtol=1e-6)


def _known_logits_session(tmp_path, ctx_len: int) -> OrtDecoderSession:
    """A retained-state graph whose logits are KNOWN_LOGITS for every row and step (its KV state is carried)."""
    vocab = KNOWN_LOGITS.size
    state = [f"past_{kind}.0" for kind in ("key", "value")]
    nodes = [
        helper.make_node("Shape", ["input_ids"], ["ids_shape"]),
        helper.make_node("Slice", ["ids_shape", "zero", "one"], ["batch"]),
        helper.make_node("Concat", ["batch", "ones"], ["logits_shape"], axis=0),
        helper.make_node("Expand", ["known", "logits_shape"], ["logits"]),
        *(helper.make_node("Identity", [s], [f"{s}_RetainedState"]) for s in state),
    ]
    inits = [
        helper.make_tensor("known", TensorProto.FLOAT, [1, 1, vocab], KNOWN_LOGITS.tolist()),
        helper.make_tensor("zero", TensorProto.INT64, [1], [0]),
        helper.make_tensor("one", TensorProto.INT64, [1], [1]),
        helper.make_tensor("ones", TensorProto.INT64, [2], [1, 1]),
    ]
    kv = ["batch", 1, ctx_len, 1]
    graph = helper.make_graph(
        nodes,
        "known_logits",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
            helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "seq"]),
            *(helper.make_tensor_value_info(s, TensorProto.FLOAT, kv) for s in state),
        ],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 1, vocab]),
            *(helper.make_tensor_value_info(f"{s}_RetainedState", TensorProto.FLOAT, kv) for s in state),
        ],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    onnx.checker.check_model(model)
    path = tmp_path / "known_logits.onnx"
    onnx.save(model, path)
    return OrtDecoderSession(path, {}, ["CPUExecutionProvider"], prefill_seq_len=4)


def _chi_square_critical(dof: int, z: float) -> float:
    """Upper quantile of chi-square (Wilson-Hilferty approximation; within 1% here), ``z`` the normal quantile."""
    a = 2 / (9 * dof)
    return dof * (1 - a + z * math.sqrt(a)) ** 3


Z_ONE_IN_A_MILLION = 4.753  # one-sided standard normal quantile for p = 1e-6


@pytest.mark.parametrize(
    "temperature, top_k, top_p, min_p",
    [(1.0, None, 1.0, None), (0.7, 6, 1.0, None), (1.3, None, 0.85, None), (1.5, None, 1.0, 0.08)],
)
def test_draws_follow_filtered_softmax_of_known_logits(tmp_path, temperature, top_k, top_p, min_p):
    """Chi-square goodness of fit over 12 000 draws through the runtime and an ORT graph with known logits.

    False-failure rate: a correct sampler exceeds the critical value with probability 1e-6 per case (4e-6 for the
    four cases); the seeds are fixed, so the run is deterministic. Filtered tokens must never be drawn.
    """
    ctx_len = 3003
    session = _known_logits_session(tmp_path, ctx_len)
    options = GenerationOptions(
        SamplingOptions(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=0),
        max_new_tokens=3000,
    )
    requests = [
        Request(
            [1, 2, 3, 4],
            GenerationOptions(SamplingOptions(**{**options.sampling.__dict__, "seed": s}), options.max_new_tokens),
            ctx_len,
            index=s,
        )
        for s in range(4)
    ]
    run_static(session, requests, batch_size=4, pad_token_id=0, start=0.0)
    draws = np.concatenate([r.generated for r in requests])
    assert draws.size == 12_000
    expected = sampling_probabilities(KNOWN_LOGITS, options.sampling)
    counts = np.bincount(draws, minlength=KNOWN_LOGITS.size)
    kept = expected > 0
    assert counts[~kept].sum() == 0, "a filtered token was drawn"
    assert kept.sum() >= 3 and (expected[kept] * draws.size >= 5).all()
    chi2 = float((((counts[kept] - expected[kept] * draws.size) ** 2) / (expected[kept] * draws.size)).sum())
    assert chi2 < _chi_square_critical(int(kept.sum()) - 1, Z_ONE_IN_A_MILLION)

"""kv-retained-state at the three levels of the pass library: a hand-built one-head attention where it must fire, a
graph where it must not (and says why), a one-layer exported decoder checked numerically step by step against the
vanilla graph, and idempotence (a converted graph is recognised and left as it is)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx_ir.passes import PreconditionError

from qgraph.passes.kv_retained_state import KVRetainedState
from qgraph.verify import run_on_ort
from tests.passes.conftest import copy, parse, run_twice

HEADER = '<ir_version: 10, opset_import: ["" : 20]>'
VOCAB, DIM = 16, 4
EMBED = np.random.default_rng(0).normal(size=(VOCAB, DIM)).astype(np.float32)
HEAD = np.random.default_rng(1).normal(size=(DIM, VOCAB)).astype(np.float32)

# One head, K = V = Q = the embedding: attention over past + new keys, causal and padding mask from attention_mask
# (key k visible to the query at total position q iff k <= q and attention_mask[k] = 1), as HF builds it.
ATTENTION = """
    g (int64[b, s] input_ids, int64[b, t] attention_mask, int64[b, s] position_ids,
       float[b, 1, p, 4] PAST_K, float[b, 1, p, 4] PAST_V)
      => (float[b, s, 16] logits, float[b, 1, t, 4] PRESENT_K, float[b, 1, t, 4] PRESENT_V) {
        emb = Gather(embed, input_ids)
        one = Constant<value = int64[1] {1}>()
        q = Unsqueeze(emb, one)
        PRESENT_K = Concat<axis = -2>(PAST_K, q)
        PRESENT_V = Concat<axis = -2>(PAST_V, q)
        kt = Transpose<perm = [0, 1, 3, 2]>(PRESENT_K)
        scores = MatMul(q, kt)
        t_shape = Shape<start = 1, end = 2>(attention_mask)
        s_shape = Shape<start = 1, end = 2>(input_ids)
        zero = Constant<value = int64 {0}>()
        step = Constant<value = int64 {1}>()
        t_len = Squeeze(t_shape)
        s_len = Squeeze(s_shape)
        first = Sub(t_len, s_len)
        kpos = Range(zero, t_len, step)
        qpos = Range(first, t_len, step)
        zero1 = Constant<value = int64[1] {0}>()
        kpos_row = Unsqueeze(kpos, zero1)
        qpos_col = Unsqueeze(qpos, one)
        causal = LessOrEqual(kpos_row, qpos_col)
        axes01 = Constant<value = int64[2] {0, 1}>()
        causal4 = Unsqueeze(causal, axes01)
        real = Cast<to = 9>(attention_mask)
        axes12 = Constant<value = int64[2] {1, 2}>()
        real4 = Unsqueeze(real, axes12)
        allowed = And(causal4, real4)
        hidden = Constant<value = float {-1e9}>()
        masked = Where(allowed, scores, hidden)
        probs = Softmax<axis = -1>(masked)
        ctx = MatMul(probs, PRESENT_V)
        ctx3 = Squeeze(ctx, one)
        logits = MatMul(ctx3, head)
    }"""


# ONNX text names cannot hold dots: the exporter's names are given after parsing
EXPORT_NAMES = {
    "PAST_K": "past_key_values.0.key",
    "PAST_V": "past_key_values.0.value",
    "PRESENT_K": "present.0.key",
    "PRESENT_V": "present.0.value",
}


def _attention(text: str = ATTENTION) -> ir.Model:
    model = parse(HEADER + text, embed=EMBED, head=HEAD)
    for value in [*model.graph.inputs, *model.graph.outputs]:
        value.name = EXPORT_NAMES.get(value.name, value.name)
    return model


def _vanilla_steps(model: ir.Model, steps: list[list[int]]) -> list[np.ndarray]:
    """Logits of each step of one unpadded row through the vanilla graph, its KV grown by the graph's Concat."""
    names = [v.name for v in model.graph.inputs if v.name.startswith("past_key_values")]
    past = {n: np.zeros([1, *_static_tail(model, n)], np.float32) for n in names}
    length, out = 0, []
    for ids in steps:
        feeds = {
            "input_ids": np.array([ids]),
            "attention_mask": np.ones((1, length + len(ids)), np.int64),
            "position_ids": np.arange(length, length + len(ids))[None],
            **past,
        }
        results = run_on_ort(model, feeds)
        past = {n: results[n.replace("past_key_values", "present")] for n in names}
        length += len(ids)
        out.append(results["logits"][0])
    return out


def _static_tail(model: ir.Model, name: str) -> list[int]:
    """``[heads, 0, head_dim]``: an empty past of the input's static heads and head size."""
    dims = next(v for v in model.graph.inputs if v.name == name).shape.dims
    return [dims[1], 0, dims[3]]


def _retained_steps(model: ir.Model, steps: list[list[list[int]]], ctx_len: int) -> list[np.ndarray]:
    """Logits of each step through the retained-state graph for a batch of rows padded with -1 positions."""
    pasts = [v for v in model.graph.inputs if v.name.startswith("past_")]
    assert all(v.shape.dims[2] == ctx_len for v in pasts)
    state = {v.name: np.zeros([len(steps[0]), *[int(d) for d in v.shape.dims[1:]]], np.float32) for v in pasts}
    lengths = [0] * len(steps[0])
    out = []
    for rows in steps:
        width = max(len(r) for r in rows)
        ids = np.zeros((len(rows), width), np.int64)
        pos = np.full((len(rows), width), -1, np.int64)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = row
            pos[i, : len(row)] = np.arange(lengths[i], lengths[i] + len(row))
            lengths[i] += len(row)
        results = run_on_ort(model, {"input_ids": ids, "position_ids": pos, **state})
        state = {n: results[f"{n}_RetainedState"] for n in state}
        out.append(results["logits"])
    return out


def test_hand_built_attention_becomes_retained_state_and_computes_the_same_logits():
    vanilla = _attention()
    model = copy(vanilla)
    result = run_twice(KVRetainedState(ctx_len=12), model)
    assert result.counts["kv_scatters"] == 2 and result.counts["masks_rebuilt"] == 1
    names = {v.name for v in model.graph.inputs}
    assert names == {"input_ids", "position_ids", "past_key.0", "past_value.0"}
    assert {o.name for o in model.graph.outputs} == {"logits", "past_key.0_RetainedState", "past_value.0_RetainedState"}
    assert not any(n.op_type == "Concat" and n.inputs[0].name.startswith("past_") for n in model.graph)

    reference = _vanilla_steps(vanilla, [[3, 7, 1], [9], [4]])  # prefill 3 tokens, then two decode steps
    # row 0 is the reference prompt; row 1 a shorter prompt padded with position -1 in the prefill step
    got = _retained_steps(model, [[[3, 7, 1], [5]], [[9], [2]], [[4], [6]]], ctx_len=12)
    for step, (ref, out) in enumerate(zip(reference, got, strict=True)):
        np.testing.assert_allclose(out[0], ref, rtol=1e-5, atol=1e-5, err_msg=f"step {step}")
    # the padded row equals its own unpadded run: padding never corrupted a slot it attends
    alone = _vanilla_steps(_attention(), [[5], [2], [6]])
    np.testing.assert_allclose(got[0][1, :1], alone[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got[1][1], alone[1], rtol=1e-5, atol=1e-5)


def test_a_past_input_without_its_append_is_refused_naming_its_consumers():
    text = ATTENTION.replace(
        "PRESENT_V = Concat<axis = -2>(PAST_V, q)",
        "PRESENT_V = Identity(PAST_V)",
    )
    model = _attention(text)
    with pytest.raises(PreconditionError, match=r"past_key_values.0.value is not appended to .* Identity"):
        KVRetainedState(ctx_len=12)(model)


def test_a_converted_graph_for_another_ctx_len_is_refused_with_what_to_do():
    model = _attention()
    KVRetainedState(ctx_len=12)(model)
    with pytest.raises(PreconditionError, match=r"already.*ctx_len 12.*vanilla export"):
        KVRetainedState(ctx_len=16)(model)


def test_one_layer_decoder_matches_the_vanilla_graph_step_by_step(one_layer_model):
    vanilla = one_layer_model("llama")
    model = copy(vanilla)
    assert run_twice(KVRetainedState(ctx_len=32), model).counts["kv_scatters"] == 2
    reference = _vanilla_steps(vanilla, [[5, 9, 17, 33], [41], [2]])
    got = _retained_steps(model, [[[5, 9, 17, 33]], [[41]], [[2]]], ctx_len=32)
    for step, (ref, out) in enumerate(zip(reference, got, strict=True)):
        np.testing.assert_allclose(out[0], ref, rtol=1e-4, atol=1e-4, err_msg=f"step {step}")

"""group-query-attention's matcher on small ONNX-text graphs: the retained-state attention fuses (logits unchanged on
ONNX Runtime), and every way a candidate can differ from GQA's form is refused with a reason that names it."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from qgraph import contract
from qgraph.pass_manager import op_histogram
from qgraph.passes.group_query_attention import GroupQueryAttentionFusion
from tests.passes.conftest import assert_refused, parse_edited, run_twice

CTX, HEADS, KV_HEADS, SEQ, HEAD = 8, 2, 1, 2, 8

# past_k / past_v stand for the contract's buffer names (ONNX text has no dots in names): renamed after parsing.
ATTENTION = """
<ir_version: 10, opset_import: ["" : 20]>
attention (int64[1,2] input_ids, int64[1,2] position_ids, float[1,2,2,8] q, float[1,1,2,8] k, float[1,1,2,8] v,
           float[1,1,8,8] past_k, float[1,1,8,8] past_v)
       => (float[1,2,2,8] out, float[1,1,8,8] present_k, float[1,1,8,8] present_v)
<int64[8] slots = {0,1,2,3,4,5,6,7}, int64[2] qaxes = {1,3}, float zero = {0.0}, float hidden = {-3.0e38},
 int64 izero = {0}, int64[4] kvshape = {1,1,1,8}, float scale = {0.35355339}, int64 width = {3}>
{
  query = Unsqueeze(position_ids, qaxes)
  visible = LessOrEqual(slots, query)
  mask = Where(visible, zero, hidden)
  realb = GreaterOrEqual(position_ids, izero)
  real = Unsqueeze(realb, qaxes)
  where_to = Unsqueeze(position_ids, qaxes)
  idx = Expand(where_to, kvshape)
  kz = Where(real, k, zero)
  present_k = ScatterElements<axis=2>(past_k, idx, kz)
  vz = Where(real, v, zero)
  present_v = ScatterElements<axis=2>(past_v, idx, vz)
  kt = Transpose<perm=[0,1,3,2]>(present_k)
  scores = MatMul(q, kt)
  scaled = Mul(scores, scale)
  biased = Add(scaled, mask)
  probs = Softmax<axis=-1>(biased)
  context = MatMul(probs, present_v)
  out = Transpose<perm=[0,2,1,3]>(context)
}
"""
RENAMES = {
    "past_k": contract.retained_input_name(0, "key"),
    "past_v": contract.retained_input_name(0, "value"),
    "present_k": contract.retained_output_name(contract.retained_input_name(0, "key")),
    "present_v": contract.retained_output_name(contract.retained_input_name(0, "value")),
}


def attention(*edits: tuple[str, str]) -> ir.Model:
    """The attention graph with each ``(old, new)`` text edit applied."""
    return parse_edited(ATTENTION, edits, RENAMES)


def _run(model: ir.Model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _feeds(position_ids: list[int], seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    pasts = {RENAMES[n]: rng.standard_normal((1, KV_HEADS, CTX, HEAD)).astype(np.float32) for n in ("past_k", "past_v")}
    pos = np.array([position_ids], np.int64)
    # the slots before the first position hold what earlier steps wrote; later slots are never attended
    for name in pasts:
        pasts[name][:, :, pos.min() :] = 0
    return {
        "input_ids": np.zeros((1, SEQ), np.int64),
        "position_ids": pos,
        "q": rng.standard_normal((1, HEADS, SEQ, HEAD)).astype(np.float32),
        "k": rng.standard_normal((1, KV_HEADS, SEQ, HEAD)).astype(np.float32),
        "v": rng.standard_normal((1, KV_HEADS, SEQ, HEAD)).astype(np.float32),
        **pasts,
    }


@pytest.mark.parametrize(
    ("edits", "window"),
    [
        ((), -1),
        (
            (
                (
                    "  mask = Where(visible, zero, hidden)",
                    "  oldest = Sub(query, width)\n  inside = Greater(slots, oldest)\n"
                    "  both = And(visible, inside)\n  mask = Where(both, zero, hidden)",
                ),
            ),
            3,
        ),
    ],
    ids=["causal", "sliding-window"],
)
def test_the_retained_state_attention_fuses_with_equal_outputs(edits, window):
    model = attention(*edits)
    before = [_run(model, _feeds(p, seed)) for seed, p in enumerate(([0, 1], [4, 5], [6, -1]))]
    result = run_twice(GroupQueryAttentionFusion(), model)
    assert result.counts["fused"] == 1 and result.misses == []
    assert op_histogram(model)["com.microsoft::GroupQueryAttention"] == 1 and not op_histogram(model)["Softmax"]
    [gqa] = [n for n in model.graph if n.op_type == "GroupQueryAttention"]
    assert gqa.attributes["local_window_size"].as_int() == window
    for seed, p in enumerate(([0, 1], [4, 5], [6, -1])):
        out, *presents = _run(model, _feeds(p, seed))
        real = np.array(p) >= 0
        want = before[seed][0].reshape(1, SEQ, HEADS * HEAD)
        np.testing.assert_allclose(out.reshape(1, SEQ, -1)[:, real], want[:, real], rtol=1e-5, atol=1e-5)


REFUSALS = {
    # the Softmax and the score Add
    "softmax-of-raw-scores": ([("probs = Softmax<axis=-1>(biased)", "probs = Softmax<axis=-1>(scaled)")],
                              "the Softmax does not read scores + mask"),
    "probs-read-twice": ([("out = Transpose<perm=[0,2,1,3]>(context)",
                           "out = Transpose<perm=[0,2,1,3]>(context)\n  extra = Identity(probs)")],
                         "the Softmax's probabilities have more than one reader"),
    # the causal mask (both operands of the Add are tried; the reason quotes each)
    "mask-not-where": ([("mask = Where(visible, zero, hidden)", "mask = Cast<to=1>(visible)")],
                       "the mask is not computed by a Where"),
    "mask-visible-not-zero": ([("mask = Where(visible, zero, hidden)", "mask = Where(visible, scale, hidden)")],
                              "the mask's visible value is not the constant 0"),
    "mask-hidden-not-constant": ([("mask = Where(visible, zero, hidden)", "mask = Where(visible, zero, scores)")],
                                 "the mask's hidden value is not a constant scalar"),
    "mask-hides-nothing": ([("float hidden = {-3.0e38}", "float hidden = {-1.0}")],
                           "the mask's hidden value -1 does not hide a key"),
    "mask-condition-other": ([("visible = LessOrEqual(slots, query)", "visible = Less(slots, query)")],
                             "the mask's condition is neither LessOrEqual(slots, q) nor And(causal, window)"),
    "mask-slots-not-constant": ([("visible = LessOrEqual(slots, query)", "visible = LessOrEqual(where_to, query)")],
                                "the key slots the mask compares are not constant"),
    "mask-queries-not-positions": ([("query = Unsqueeze(position_ids, qaxes)", "query = Unsqueeze(input_ids, qaxes)")],
                                   "the mask's queries are not position_ids"),
    "window-first-not-causal": ([("mask = Where(visible, zero, hidden)",
                                  "both = And(realb, visible)\n  mask = Where(both, zero, hidden)")],
                                "the windowed mask's first term is not LessOrEqual"),
    "window-second-not-greater": ([("mask = Where(visible, zero, hidden)",
                                    "both = And(visible, realb)\n  mask = Where(both, zero, hidden)")],
                                  "the windowed mask's second term is not Greater"),
    "window-bound-not-sub": ([("mask = Where(visible, zero, hidden)",
                               "inside = Greater(slots, query)\n  both = And(visible, inside)\n"
                               "  mask = Where(both, zero, hidden)")],
                             "the window's lower bound is not Sub(query, w)"),
    "window-width-not-constant": ([("mask = Where(visible, zero, hidden)",
                                    "oldest = Sub(query, where_to)\n  inside = Greater(slots, oldest)\n"
                                    "  both = And(visible, inside)\n  mask = Where(both, zero, hidden)")],
                                  "the window's width is not a constant >= 1"),
    "window-other-slots": ([("mask = Where(visible, zero, hidden)",
                             "oldest = Sub(query, width)\n  inside = Greater(where_to, oldest)\n"
                             "  both = And(visible, inside)\n  mask = Where(both, zero, hidden)")],
                           "the window and the causal test compare different slots"),
    "window-other-queries": ([("mask = Where(visible, zero, hidden)",
                               "oldest = Sub(where_to, width)\n  inside = Greater(slots, oldest)\n"
                               "  both = And(visible, inside)\n  mask = Where(both, zero, hidden)")],
                             "the window and the causal test read different queries"),
    # the scale
    "scale-not-constant": ([("scaled = Mul(scores, scale)", "scaled = Mul(scores, scores)")],
                           "the scores are scaled by Mul with a non-constant factor"),
    "scale-zero": ([("scaled = Mul(scores, scale)", "scaled = Mul(scores, zero)")],
                   "the scores are scaled by a zero constant"),
    # the score MatMul, plain or grouped
    "scores-not-matmul": ([("scaled = Mul(scores, scale)", "scaled = Identity(scores)")],
                          "the unscaled scores are not computed by a MatMul"),
    "scores-an-input": ([("scaled = Mul(scores, scale)", "scaled = Mul(q, scale)")],
                        "the unscaled scores are not computed by a MatMul"),
    "grouped-reshape-of-other": ([("scaled = Mul(scores, scale)", "scaled = Reshape(q, kvshape)")],
                                 "a Reshape of q"),
    "grouped-query-not-reshaped": ([("scaled = Mul(scores, scale)",
                                     "grouped = Reshape(scores, kvshape)\n  scaled = Mul(grouped, scale)")],
                                   "the grouped score MatMul's query is not reshaped"),
    "keys-not-transposed": ([("kt = Transpose<perm=[0,1,3,2]>(present_k)",
                              "kt = Transpose<perm=[1,0,3,2]>(present_k)")],
                            "the scores' keys are not Transpose(K, [0,1,3,2])"),
    # the keys: the KV scatter of the retained-state pass
    "keys-not-scattered": ([("kt = Transpose<perm=[0,1,3,2]>(present_k)", "kt = Transpose<perm=[0,1,3,2]>(past_k)")],
                           "the keys are not the retained-state buffer: the buffer is not written by ScatterElements"),
    "keys-scatter-axis": ([("present_k = ScatterElements<axis=2>", "present_k = ScatterElements<axis=3>")],
                          "the KV scatter writes axis 3, not the sequence axis 2"),
    "keys-buffer-not-input": ([("present_k = ScatterElements<axis=2>(past_k, idx, kz)",
                                "fresh = Identity(past_k)\n  present_k = ScatterElements<axis=2>(fresh, idx, kz)")],
                              "the KV scatter's buffer is not a graph input"),
    "keys-not-output": ([("present_k = ScatterElements<axis=2>(past_k, idx, kz)",
                          "written = ScatterElements<axis=2>(past_k, idx, kz)\n  present_k = Identity(written)"),
                         ("kt = Transpose<perm=[0,1,3,2]>(present_k)", "kt = Transpose<perm=[0,1,3,2]>(written)")],
                        "the KV scatter's result is not a graph output"),
    # probs @ V, plain or grouped
    "probs-not-matmul": ([("context = MatMul(probs, present_v)",
                           "probs2 = Identity(probs)\n  context = MatMul(probs2, present_v)")],
                         "the Softmax is not read by a MatMul as probs @ V"),
    "grouped-probs-not-matmul": ([("context = MatMul(probs, present_v)",
                                   "rows = Reshape(probs, kvshape)\n  context = Identity(rows)")],
                                 "the grouped probs are not read by a MatMul"),
    "grouped-probs-second": ([("context = MatMul(probs, present_v)",
                               "rows = Reshape(probs, kvshape)\n  context = MatMul(present_v, rows)")],
                             "the grouped probs are the MatMul's second operand"),
    "grouped-not-reshaped-back": ([("context = MatMul(probs, present_v)",
                                    "rows = Reshape(probs, kvshape)\n  grouped = MatMul(rows, present_v)\n"
                                    "  context = Identity(grouped)")],
                                  "the grouped probs @ V is not reshaped back"),
    "values-not-scattered": ([("context = MatMul(probs, present_v)", "context = MatMul(probs, past_v)")],
                             "the values are not the retained-state buffer: the buffer is not written by"),
    "not-transposed-back": ([("out = Transpose<perm=[0,2,1,3]>(context)", "out = Transpose<perm=[0,1,2,3]>(context)")],
                            "probs @ V is not transposed back to [b, s, heads, d]"),
    # head geometry
    "query-heads-symbolic": ([("float[1,2,2,8] q", "float[1,H,2,8] q")],
                             "the query's heads or head size are not static"),
    "kv-heads-symbolic": ([("float[1,1,2,8] k", "float[1,N,2,8] k")], "the new keys' head count is not static"),
    "heads-not-multiple": ([("float[1,2,2,8] q", "float[1,3,2,8] q"), ("float[1,1,2,8] k", "float[1,2,2,8] k")],
                           "3 query heads are not a multiple of 2 KV heads"),
    "values-other-geometry": ([("float[1,1,2,8] v", "float[1,1,2,4] v")],
                              "K and V differ in head count or head size from the query's"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(REFUSALS))
def test_each_refusal_names_its_reason_and_changes_nothing(case):
    edits, reason = REFUSALS[case]
    result = assert_refused(GroupQueryAttentionFusion(), attention(*edits), "Softmax", reason)
    assert result.counts == {"fused": 0, "softmax_left_unfused": 1}


def test_a_graph_without_the_contract_inputs_is_refused_with_the_reason():
    model = attention()
    model.graph.inputs.remove(next(v for v in model.graph.inputs if v.name == "input_ids"))
    result = GroupQueryAttentionFusion()(model)
    assert result.counts == {"fused": 0} and "no position_ids or input_ids input" in result.misses[0]


def test_optimize_explain_lists_each_unfused_candidate_with_its_reason(tmp_path, capsys):
    from qgraph.cli import main

    source, target = tmp_path / "attention.onnx", tmp_path / "out.onnx"
    ir.save(attention(*REFUSALS["keys-not-transposed"][0]), source)
    assert main(["optimize", str(source), "-o", str(target), "--passes", "group-query-attention", "--explain"]) == 0
    out = capsys.readouterr().out
    assert "not fused: Softmax (unnamed): the scores' keys are not Transpose(K, [0,1,3,2])" in out
    assert main(["optimize", str(source), "-o", str(target), "--passes", "group-query-attention"]) == 0
    assert "not fused" not in capsys.readouterr().out

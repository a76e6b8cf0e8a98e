"""rotary-embedding's matcher on small ONNX-text graphs: a rotate_half RoPE fuses (outputs unchanged on ONNX Runtime),
and every way a candidate differs from that form is refused with a reason that names it."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from qgraph import contract
from qgraph.pass_manager import op_histogram
from qgraph.passes.rotary_embedding import RotaryEmbeddingFusion
from tests.passes.conftest import assert_refused, parse_edited, run_twice

# past_k stands for the contract's first key buffer (ONNX text has no dots in names): renamed after parsing. Its
# static length (8) sets the rows of the cos/sin tables.
ROPE = """
<ir_version: 10, opset_import: ["" : 20]>
rope (int64[1,2] input_ids, int64[1,2] position_ids, float[1,2,2,8] x, float[1,1,8,8] past_k) => (float[1,2,2,8] y)
<float[4] inv_freq = {1.0, 0.1, 0.01, 0.001}, float[4] other_freq = {1.0, 0.5, 0.25, 0.125},
 int64[1] ax1 = {1}, int64[1] ax2 = {2}, int64[1] ax3 = {3}, int64[1] start = {0}, int64[1] half = {4},
 int64[1] quarter = {2}, int64[1] end = {9223372036854775807}>
{
  pos_f = Cast<to=1>(position_ids)
  pos_u = Unsqueeze(pos_f, ax2)
  f = Mul(pos_u, inv_freq)
  emb = Concat<axis=-1>(f, f)
  c = Cos(emb)
  s = Sin(emb)
  cu = Unsqueeze(c, ax1)
  su = Unsqueeze(s, ax1)
  x1 = Slice(x, start, half, ax3)
  x2 = Slice(x, half, end, ax3)
  nx2 = Neg(x2)
  rot = Concat<axis=-1>(nx2, x1)
  a = Mul(x, cu)
  b = Mul(rot, su)
  y = Add(a, b)
}
"""


def rope(*edits: tuple[str, str]) -> ir.Model:
    """The RoPE graph with each ``(old, new)`` text edit applied."""
    return parse_edited(ROPE, edits, {"past_k": contract.retained_input_name(0, "key")})


def _run(model: ir.Model, positions: list[int]) -> np.ndarray:
    feeds = {
        "input_ids": np.zeros((1, 2), np.int64),
        "position_ids": np.array([positions], np.int64),
        "x": np.random.default_rng(sum(positions)).standard_normal((1, 2, 2, 8)).astype(np.float32),
        contract.retained_input_name(0, "key"): np.zeros((1, 1, 8, 8), np.float32),
    }
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def test_a_rotate_half_rope_fuses_with_equal_outputs():
    model = rope()
    positions = ([0, 1], [5, 7])
    before = [_run(model, p) for p in positions]
    result = run_twice(RotaryEmbeddingFusion(), model)
    assert result.counts == {"fused": 1} and result.misses == []
    hist = op_histogram(model)
    assert hist["com.microsoft::RotaryEmbedding"] == 1 and not hist["Neg"] and not hist["Cos"]
    for p, want in zip(positions, before, strict=True):
        np.testing.assert_allclose(_run(model, p), want, rtol=1e-5, atol=1e-5)


REFUSALS = {
    "no-rotate-half": ([("b = Mul(rot, su)", "b = Mul(x, su)")],
                       "neither product multiplies rotate_half(x)"),
    "concat-of-three": ([("rot = Concat<axis=-1>(nx2, x1)", "rot = Concat<axis=-1>(nx2, x1, x1)")],
                        "rotate_half's Concat has 3 inputs, not 2"),
    "no-neg-first": ([("rot = Concat<axis=-1>(nx2, x1)", "rot = Concat<axis=-1>(x2, x1)")],
                     "rotate_half's Concat does not start with Neg(x2)"),
    "neg-of-whole": ([("nx2 = Neg(x2)", "nx2 = Neg(x)")],
                     "rotate_half negates something other than a Slice"),
    "no-slice-last": ([("rot = Concat<axis=-1>(nx2, x1)", "rot = Concat<axis=-1>(nx2, x)")],
                      "rotate_half's Concat does not end with a Slice"),
    "halves-of-different-values": ([("x1 = Slice(x, start, half, ax3)",
                                     "xc = Identity(x)\n  x1 = Slice(xc, start, half, ax3)")],
                                   "rotate_half's halves are slices of different values"),
    "head-size-symbolic": ([("float[1,2,2,8] x", "float[1,2,2,D] x")],
                           "is not [b, heads, s, d] with a static head size"),
    "first-half-wrong": ([("x1 = Slice(x, start, half, ax3)", "x1 = Slice(x, start, quarter, ax3)")],
                         "rotate_half's first half is not x[..., :4]"),
    "second-half-wrong": ([("x2 = Slice(x, half, end, ax3)", "x2 = Slice(x, quarter, end, ax3)")],
                          "rotate_half's second half is not x[..., 4:]"),
    "halves-on-other-axis": ([("x1 = Slice(x, start, half, ax3)", "x1 = Slice(x, start, half, ax2)")],
                             "rotate_half's halves are not sliced on the last axis with step 1"),
    "cos-times-other": ([("a = Mul(x, cu)", "xc = Identity(x)\n  a = Mul(xc, cu)")],
                        "the other product does not multiply the rotated value itself"),
    "no-cos": ([("a = Mul(x, cu)", "a = Mul(x, su)")],
               "x is not multiplied by Unsqueeze(Cos(angles), 1)"),
    "no-sin": ([("b = Mul(rot, su)", "b = Mul(rot, cu)")],
               "rotate_half(x) is not multiplied by Unsqueeze(Sin(angles), 1)"),
    "angles-not-doubled": ([("emb = Concat<axis=-1>(f, f)", "g = Identity(f)\n  emb = Concat<axis=-1>(f, g)")],
                           "the cos table's angles are not Concat(f, f)"),
    "angles-not-a-product": ([("f = Mul(pos_u, inv_freq)", "f = Add(pos_u, inv_freq)")],
                             "the cos table's f is not Mul(positions, inv_freq)"),
    "angles-not-from-positions": ([("pos_f = Cast<to=1>(position_ids)", "pos_f = Cast<to=1>(input_ids)")],
                                  "the cos table's f is not a constant inv_freq times positions read from"),
    "different-frequencies": ([("s = Sin(emb)", "g = Mul(pos_u, other_freq)\n  e2 = Concat<axis=-1>(g, g)\n"
                                "  s = Sin(e2)")],
                              "the cos and sin tables use different frequencies"),
    "partial-rotary": ([("float[4] inv_freq = {1.0, 0.1, 0.01, 0.001}", "float[2] inv_freq = {1.0, 0.1}")],
                       "2 frequencies rotate 4 of the head's 8 dimensions (partial rotary)"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(REFUSALS))
def test_each_refusal_names_its_reason_and_changes_nothing(case):
    edits, reason = REFUSALS[case]
    assert assert_refused(RotaryEmbeddingFusion(), rope(*edits), "Add", reason).counts == {"fused": 0}


def test_a_graph_without_retained_state_is_refused_with_the_reason():
    model = rope()
    model.graph.inputs.pop()  # the KV buffer: no ctx_len for the tables
    result = RotaryEmbeddingFusion()(model)
    assert result.counts == {"fused": 0} and "not a retained-state graph" in result.misses[0]

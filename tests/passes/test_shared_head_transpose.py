"""shared-head-transpose: q/k/v split after one Reshape + Transpose to the heads layout; a split whose parts are not
all reshaped to heads is left alone; outputs stay equal on ORT; idempotent."""

from __future__ import annotations

import numpy as np
import pytest

from qgraph.pass_manager import PassSpec, op_histogram, run_pipeline
from qgraph.passes.shared_head_transpose import SharedHeadTranspose
from qgraph.verify import max_abs_diff_on_ort
from tests.passes.conftest import N_LAYERS, copy, parse, run_twice

HEADER = '<ir_version: 10, opset_import: ["" : 20]>'
# q with 4 heads, k and v with 2 heads each, head_dim 3: a grouped-query projection split three ways
QKV = """
    g (float[2, 5, 24] x) => (float[2, 4, 5, 3] q, float[2, 2, 5, 3] k, float[2, 2, 5, 3] v) {
        sizes = Constant<value = int64[3] {12, 6, 6}>()
        qf, kf, vf = Split<axis = -1>(x, sizes)
        qs = Constant<value = int64[4] {2, 5, 4, 3}>()
        ks = Constant<value = int64[4] {2, 5, 2, 3}>()
        q4 = Reshape(qf, qs)
        k4 = Reshape(kf, ks)
        v4 = Reshape(vf, ks)
        q = Transpose<perm = [0, 2, 1, 3]>(q4)
        k = Transpose<perm = [0, 2, 1, 3]>(k4)
        v = Transpose<perm = [0, 2, 1, 3]>(v4)
    }"""


def _qkv(text: str = QKV):
    from qgraph.passes.cleanup import fill_unknown_shapes

    model = parse(HEADER + text)
    fill_unknown_shapes(model)  # the pass reads the Reshapes' static [heads, head_dim]
    return model


def test_three_head_reshapes_become_one_reshape_transpose_and_split():
    model = _qkv()
    before = copy(model)
    result = run_twice(SharedHeadTranspose(), model)
    assert result.counts == {"splits_moved": 1, "reshapes_transposes_removed": 4}
    hist = op_histogram(model)
    assert hist["Reshape"] == 1 and hist["Transpose"] == 1 and hist["Split"] == 1
    assert max_abs_diff_on_ort(before, model) == 0.0


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ("k = Transpose<perm = [0, 2, 3, 1]>(k4)", "k transposed for the scores, not to the heads layout"),
        ("v = Identity(vf)", "v is not reshaped to heads"),
    ],
)
def test_a_split_whose_parts_are_not_all_heads_is_left_alone(change, why):
    target = change.split(" = ")[0]
    lines = [line for line in QKV.splitlines() if not line.strip().startswith(f"{target} = ")]
    text = "\n".join(lines).replace("    }", f"        {change}\n    }}")
    model = _qkv(text)
    hist = op_histogram(model)
    assert not SharedHeadTranspose()(model).modified, why
    assert op_histogram(model) == hist


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_every_layer_of_a_decoder_shares_one_head_transpose_and_outputs_are_unchanged(retained_model, arch):
    model = retained_model(arch)
    run_pipeline(model, [PassSpec("merge-parallel-matmuls")])  # Llama's q/k/v become one MatMul + Split
    before = copy(model)
    [report] = run_pipeline(model, [PassSpec("shared-head-transpose")])
    assert report.counts["splits_moved"] == N_LAYERS
    assert max_abs_diff_on_ort(before, model) < 1e-5


def test_one_layer_decoder_is_numerically_unchanged_and_idempotent(one_layer_model):
    model = one_layer_model("gpt2", retained=True)
    before = copy(model)
    assert run_twice(SharedHeadTranspose(), model).counts["splits_moved"] == 1
    assert max_abs_diff_on_ort(before, model) < 1e-5
    assert np.isfinite(max_abs_diff_on_ort(before, model, seed=1))

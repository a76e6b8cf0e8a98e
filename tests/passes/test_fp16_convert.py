"""fp16-convert: weights and activations in float16, norm pieces and position arithmetic in float32, logits float32,
KV buffers float16; graphs with nothing to convert are left alone; a decoder keeps its greedy tokens; idempotent."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx_ir.passes import PreconditionError

from qgraph import QEFFAutoModelForCausalLM
from qgraph.pass_manager import PassSpec, run_pipeline
from qgraph.passes.fp16_convert import FP16Convert
from qgraph.verify import max_abs_diff_on_ort, random_feeds, run_on_ort
from tests.parity import LONG_PROMPT, MY_NAME, hf_greedy
from tests.passes.conftest import copy, parse, run_twice

F16, F32 = ir.DataType.FLOAT16, ir.DataType.FLOAT
RNG = np.random.default_rng(0)
W1, W2 = (RNG.standard_normal((8, 8)).astype(np.float32) for _ in range(2))
NORM_W = np.linspace(0.5, 1.5, 8).astype(np.float32)
INV_FREQ = np.array([1.0, 0.1, 0.01, 0.001], np.float32)

BLOCK = """
    <ir_version: 10, opset_import: ["" : 20]>
    g (float[2,8] x, int64[2] pos) => (float[2,8] logits, float[2,8] rotated) {
        h = MatMul(x, w1)
        two = Constant<value = float {2.0}>()
        sq = Pow(h, two)
        axes = Constant<value = int64[1] {-1}>()
        mean = ReduceMean(sq, axes)
        eps = Constant<value = float {1e-6}>()
        var = Add(mean, eps)
        std = Sqrt(var)
        inv = Reciprocal(std)
        n = Mul(h, inv)
        normed = Mul(n, norm_w)
        logits = MatMul(normed, w2)
        p = Cast<to = 1>(pos)
        col = Constant<value = int64[1] {1}>()
        p2 = Unsqueeze(p, col)
        angle = Mul(p2, inv_freq)
        both = Concat<axis = -1>(angle, angle)
        cos = Cos(both)
        rotated = Mul(h, cos)
    }"""


def _block() -> ir.Model:
    return parse(BLOCK, w1=W1, w2=W2, norm_w=NORM_W, inv_freq=INV_FREQ)


def _dtypes(model: ir.Model) -> dict[str, ir.DataType]:
    values = [*model.graph.inputs, *model.graph.initializers.values(), *(o for n in model.graph for o in n.outputs)]
    return {v.name: v.dtype for v in values}


def test_weights_and_activations_become_float16_with_sensitive_parts_in_float32():
    model = _block()
    before = copy(model)
    result = run_twice(FP16Convert(), model)
    assert result.counts["initializers_converted"] >= 3 and result.counts["casts_inserted"] > 0
    types = _dtypes(model)
    assert types["w1"] == types["w2"] == types["norm_w"] == F16 and types["h"] == types["rotated"] == F16
    assert types["x"] == F16, "float inputs other than float32_io become float16"
    assert types["logits"] == F32, "logits are returned in float32"
    for name in ("sq", "mean", "var", "std", "inv"):  # x**2 overflows float16: the norm's reduction stays float32
        assert types[name] == F32, name
    for name in ("p", "angle", "cos", "inv_freq"):  # positions * inv_freq reach thousands of radians
        assert types[name] == F32, name
    assert max_abs_diff_on_ort(before, model) < 0.05
    out = run_on_ort(model, {"x": W1[:2] * 100, "pos": np.array([3000, 3001], np.int64)})
    assert all(np.isfinite(v).all() for v in out.values())  # h**2 ~ 1e6 would overflow float16
    exact = run_on_ort(before, {"x": W1[:2] * 100, "pos": np.array([3000, 3001], np.int64)})
    np.testing.assert_allclose(out["logits"], exact["logits"], rtol=2e-2, atol=0.5)


def test_position_arithmetic_reading_a_float_activation_is_not_kept_in_float32():
    text = BLOCK.replace("p = Cast<to = 1>(pos)", "p = ReduceSum(x, col)")  # the "angle" now comes from x
    model = parse(text, w1=W1, w2=W2, norm_w=NORM_W, inv_freq=INV_FREQ)
    FP16Convert()(model)
    types = _dtypes(model)
    assert types["cos"] == F32 and types["angle"] == F16, "only Cos itself (block list) stays float32"


def test_a_graph_without_float32_is_left_alone():
    model = parse(
        """
        <ir_version: 10, opset_import: ["" : 20]>
        g (float16[4] x, int64[4] i) => (float16[4] y, int64[4] j) {
            y = Relu(x)
            j = Neg(i)
        }"""
    )
    result = run_twice(FP16Convert(), model)
    assert not result.modified and result.counts["casts_inserted"] == 0


def test_subgraphs_are_refused_with_the_node_named():
    model = parse(
        """
        <ir_version: 10, opset_import: ["" : 20]>
        g (bool c, float[2] x) => (float[2] y) {
            y = If(c) <then_branch = t () => (float[2] a) { a = Identity(x) },
                       else_branch = e () => (float[2] b) { b = Neg(x) }>
        }"""
    )
    with pytest.raises(PreconditionError, match="If.*subgraph"):
        FP16Convert()(model)


def test_retained_state_decoder_runs_in_float16_with_float32_logits(one_layer_model):
    model = one_layer_model("llama", retained=True)
    before = copy(model)
    run_pipeline(model, [PassSpec("rmsnorm-fuse"), PassSpec("fp16-clip")])
    result = run_twice(FP16Convert(), model)
    assert result.counts["float16_nodes"] > 30
    types = {v.name: v.dtype for v in (*model.graph.inputs, *model.graph.outputs)}
    assert types["logits"] == F32
    assert all(t == F16 for name, t in types.items() if name.startswith("past_")), types
    feeds = random_feeds(before)
    out, ref = run_on_ort(model, feeds), run_on_ort(before, feeds)
    assert all(np.isfinite(v).all() for v in out.values())
    np.testing.assert_allclose(out["logits"], ref["logits"], atol=0.05)
    assert (out["logits"].argmax(-1) == ref["logits"].argmax(-1)).all()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_float16_compile_keeps_greedy_tokens(arch, tiny_model_dir, cache_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    directory = tiny_model_dir(arch)
    hf = AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager").eval()
    qg = QEFFAutoModelForCausalLM.from_pretrained(str(directory), cache_dir=cache_dir, verbose=False)
    qg.compile(prefill_seq_len=8, ctx_len=64, batch_size=2, precision="float16")
    assert [r["name"] for r in qg.artifact.reports][-3:] == ["fp16-clip", "fp16-convert", "cleanup"]
    result = qg.generate(tokenizer, [MY_NAME, LONG_PROMPT], generation_len=16, verbose=False)
    assert result.generated_ids == [hf_greedy(hf, tokenizer, p, 16) for p in (MY_NAME, LONG_PROMPT)]

"""quantize-weights: every constant-weight MatMul/Gemm (tied LM head included) becomes MatMulNBits, nothing else does,
logits stay close, the pass is idempotent, and greedy decoding through the ORT backend still works."""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from qgraph import QEFFAutoModelForCausalLM
from qgraph.pass_manager import PassSpec, op_histogram, run_pipeline
from qgraph.passes.quantize_weights import QuantizeWeights
from tests.parity import MY_NAME
from tests.passes.conftest import run_twice

# Linear layers of the tiny models (tests/tiny_models.py): GPT-2 has c_attn, c_proj, c_fc, mlp.c_proj per layer plus
# the tied LM head (MatMul over Transpose(wte)); Llama has q, k, v, o, gate, up, down per layer plus lm_head.
LINEARS = {"gpt2": 2 * 4 + 1, "llama": 2 * 7 + 1}


def _logits(model: ir.Model, tmp_path, name: str) -> np.ndarray:
    path = tmp_path / f"{name}.onnx"
    ir.save(model, path, external_data=f"{name}.onnx.data")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {
        "input_ids": np.array([[5, 9, 17, 33, 41, 2]], np.int64),
        "position_ids": np.arange(6)[None].astype(np.int64),
    }
    for i in session.get_inputs():
        if i.name.startswith("past_"):
            feeds[i.name] = np.zeros([1, *i.shape[1:]], np.float32)
    return session.run(["logits"], feeds)[0]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_every_linear_layer_becomes_matmulnbits(retained_model, arch):
    model = retained_model(arch)
    [report] = run_pipeline(model, [PassSpec("quantize-weights", {"bits": 4, "min_elements": 0})])
    assert report.counts["quantized"] == LINEARS[arch]
    hist = op_histogram(model)
    assert hist["com.microsoft::MatMulNBits"] == LINEARS[arch]
    assert hist["Gemm"] == 0
    assert hist["MatMul"] == 2 * 2, "only attention's two activation MatMuls per layer stay float"
    assert report.counts["weight_mib_after"] <= report.counts["weight_mib_before"]


def test_activation_matmuls_are_left_alone():
    a = ir.Value(name="a", shape=ir.Shape([2, 64]), type=ir.TensorType(ir.DataType.FLOAT))
    b = ir.Value(name="b", shape=ir.Shape([64, 64]), type=ir.TensorType(ir.DataType.FLOAT))
    node = ir.node("MatMul", [a, b])
    node.outputs[0].name = "y"
    graph = ir.Graph([a, b], node.outputs, nodes=[node], opset_imports={"": 20})
    model = ir.Model(graph, ir_version=10)
    result = QuantizeWeights(min_elements=0)(model)
    assert result.counts["quantized"] == 0 and not result.modified
    assert [n.op_type for n in model.graph] == ["MatMul"]


def _single_op_model(form: str, w: np.ndarray, bias: np.ndarray, rows: int = 4) -> ir.Model:
    """``y = x @ W (+ b)`` written the three ways exporters write it, ``x`` of ``rows`` rows."""
    k, n = w.shape
    x = ir.Value(name="x", shape=ir.Shape([rows, k]), type=ir.TensorType(ir.DataType.FLOAT))
    inits = []

    def const(name, array):
        value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.FLOAT))
        value.const_value = ir.tensor(array, name=name)
        inits.append(value)
        return value

    if form == "matmul":
        nodes = [ir.node("MatMul", [x, const("w", w)])]
    elif form == "tied-head":
        transpose = ir.node("Transpose", [const("w_nk", np.ascontiguousarray(w.T))], attributes={"perm": [1, 0]})
        nodes = [transpose, ir.node("MatMul", [x, transpose.outputs[0]])]
    else:  # gemm with transB and bias
        nodes = [ir.node("Gemm", [x, const("w_nk", np.ascontiguousarray(w.T)), const("b", bias)], {"transB": 1})]
    out = nodes[-1].outputs[0]
    out.name, out.type = "y", ir.TensorType(ir.DataType.FLOAT)
    graph = ir.Graph([x], [out], nodes=nodes, initializers=inits, opset_imports={"": 20})
    return ir.Model(graph, ir_version=10)


# Gaussian weights: one 8-bit step is ~1/60 of a block's spread, a 4-bit step ~1/4 -> rms errors ~0.5% and ~8%.
@pytest.mark.parametrize(("bits", "rms_tolerance"), [(8, 0.01), (4, 0.12)])
@pytest.mark.parametrize("accuracy_level", [0, 4])
@pytest.mark.parametrize("form", ["matmul", "tied-head", "gemm"])
def test_each_form_computes_the_same_product(tmp_path, form, bits, accuracy_level, rms_tolerance):
    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.02, (256, 96)).astype(np.float32)
    bias = rng.normal(0, 0.5, 96).astype(np.float32) if form == "gemm" else np.zeros(96, np.float32)
    x = rng.normal(0, 1, (4, 256)).astype(np.float32)
    model = _single_op_model(form, w, bias)
    result = QuantizeWeights(bits=bits, accuracy_level=accuracy_level, min_elements=0)(model)
    assert result.counts["quantized"] == 1
    assert [n.op_type for n in model.graph] == ["MatMulNBits"]
    assert len(model.graph.initializers) == (4 if form == "gemm" else 3), "float weight dropped, bias kept"
    ir.save(model, tmp_path / "m.onnx")
    y = ort.InferenceSession(str(tmp_path / "m.onnx")).run(None, {"x": x})[0]
    reference = x @ w + bias
    assert np.sqrt(((y - reference) ** 2).mean() / (reference**2).mean()) < rms_tolerance


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_int8_keeps_tiny_model_logits_close(retained_model, tmp_path, arch):
    """Tiny random models (init 0.2) amplify weight error layer by layer; int8 still keeps their argmax."""
    reference = _logits(retained_model(arch), tmp_path, "fp32")
    model = retained_model(arch)
    run_pipeline(model, [PassSpec("quantize-weights", {"bits": 8, "accuracy_level": 0, "min_elements": 0})])
    quantized = _logits(model, tmp_path, "int8")
    assert np.abs(quantized - reference).max() / np.abs(reference).max() < 0.05
    assert (quantized.argmax(-1) == reference.argmax(-1)).mean() >= 0.8


def test_idempotent(retained_model):
    model = retained_model("gpt2")
    assert run_twice(QuantizeWeights(min_elements=0), model).counts["quantized"] > 0


def test_small_weights_are_skipped_by_default(retained_model):
    model = retained_model("llama")
    [report] = run_pipeline(model, [PassSpec("quantize-weights", {"min_elements": 10**9})])
    assert report.counts["quantized"] == 0 and report.counts["skipped_small"] == LINEARS["llama"]


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="bits"):
        QuantizeWeights(bits=3)
    with pytest.raises(ValueError, match="block_size"):
        QuantizeWeights(block_size=24)
    with pytest.raises(ValueError, match="algorithm must be one of rtn, minmax, hqq, auto, got 'gptq'"):
        QuantizeWeights(algorithm="gptq")
    for algorithm in ("hqq", "minmax", "auto"):
        with pytest.raises(ValueError, match=f"'{algorithm}' is 4-bit and asymmetric"):
            QuantizeWeights(algorithm=algorithm, symmetric=True)
        with pytest.raises(ValueError, match=f"'{algorithm}' is 4-bit and asymmetric"):
            QuantizeWeights(algorithm=algorithm, bits=8)
    with pytest.raises(ValueError, match="float_zero_points must be one of split, input"):
        QuantizeWeights(float_zero_points=True)


def test_hqq_blocks_compute_the_product_at_least_as_closely_as_round_to_nearest(tmp_path):
    """HQQ refines each block's zero point (a float) to shrink the weight error: on Gaussian weights its product
    is within the round-to-nearest tolerance and not worse than ORT's asymmetric RTN by more than 5%."""
    rng = np.random.default_rng(1)
    w = rng.normal(0, 0.02, (256, 96)).astype(np.float32)
    x = rng.normal(0, 1, (4, 256)).astype(np.float32)
    reference = x @ w
    errors = {}
    for algorithm in ("rtn", "hqq"):
        model = _single_op_model("matmul", w, np.zeros(96, np.float32))
        QuantizeWeights(bits=4, accuracy_level=0, min_elements=0, algorithm=algorithm, float_zero_points="input")(model)
        [node] = model.graph
        assert node.op_type == "MatMulNBits" and node.attributes["bits"].value == 4
        zero_points = node.inputs[3].const_value.numpy()
        assert zero_points.dtype == (np.float32 if algorithm == "hqq" else np.uint8)
        ir.save(model, tmp_path / f"{algorithm}.onnx")
        y = ort.InferenceSession(str(tmp_path / f"{algorithm}.onnx")).run(None, {"x": x})[0]
        errors[algorithm] = np.sqrt(((y - reference) ** 2).mean() / (reference**2).mean())
    assert errors["hqq"] < 0.12
    assert errors["hqq"] <= 1.05 * errors["rtn"], errors


def test_int8_pipeline_generates_through_the_ort_backend(tiny_model_dir, cache_dir, tokenizer, tmp_path):
    pipeline = tmp_path / "int8.json"
    pipeline.write_text(
        '[{"name": "kv-retained-state", "options": {"ctx_len": 64}},'
        ' {"name": "quantize-weights", "options": {"bits": 8, "min_elements": 0}}, "cleanup"]'
    )
    qg = QEFFAutoModelForCausalLM.from_pretrained(str(tiny_model_dir("llama")), cache_dir=cache_dir, verbose=False)
    qg.compile(prefill_seq_len=8, ctx_len=64)
    reference = qg.generate(tokenizer, [MY_NAME], generation_len=12, verbose=False).generated_ids
    qg.compile(prefill_seq_len=8, ctx_len=64, passes=str(pipeline))
    assert "com.microsoft::MatMulNBits" in {f"{n.domain}::{n.op_type}" for n in ir.load(qg.onnx_path).graph}
    quantized = qg.generate(tokenizer, [MY_NAME], generation_len=12, verbose=False).generated_ids
    assert len(quantized[0]) == 12
    assert quantized[0][:4] == reference[0][:4]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_lm_head_keeps_8_bits_under_4_bit_blocks(retained_model, arch):
    model = retained_model(arch)
    run_pipeline(model, [PassSpec("quantize-weights", {"bits": 4, "min_elements": 0})])
    logits = next(o for o in model.graph.outputs if o.name == "logits")
    nbits = {n.name: n.attributes["bits"].value for n in model.graph if n.op_type == "MatMulNBits"}
    head = logits.producer()
    while head.op_type != "MatMulNBits":
        head = next(v for v in head.inputs if v is not None and v.const_value is None).producer()
    assert nbits.pop(head.name) == 8
    assert set(nbits.values()) == {4}


def _q4_1_weight(rng, k: int, n: int, positive_block: bool = True, block: int = 32) -> np.ndarray:
    """A ``[K, N]`` weight on a Q4_1 grid: ``scale * q + min`` per block of K, every block using levels 0 and 15,
    straddling zero anywhere (``min`` from ``-15 * scale`` to 0); with ``positive_block`` each column's first block
    lies above zero (its float zero point is negative)."""
    q = rng.integers(0, 16, (n, k // block, block))
    q[..., 0], q[..., 1] = 0, 15
    scale = rng.uniform(1e-3, 1e-2, (n, k // block, 1))
    low = -rng.uniform(0.0, 15.0, (n, k // block, 1)) * scale
    if positive_block:
        low[:, 0] = rng.uniform(1e-3, 1e-2, (n, 1))
    return (scale * q + low).reshape(n, k).T.astype(np.float32)


def _weights_ort_multiplies_by(model: ir.Model, k: int, tmp_path, name: str) -> np.ndarray:
    """The ``[K, N]`` matrix a one-input graph computes with: its output for the identity's rows (float activations,
    ``accuracy_level`` 0, so nothing but the weights' blocks is approximated)."""
    ir.save(model, tmp_path / f"{name}.onnx")
    return ort.InferenceSession(str(tmp_path / f"{name}.onnx")).run(None, {"x": np.eye(k, dtype=np.float32)})[0]


def test_float_zero_points_input_reproduce_q4_1_blocks_exactly(tmp_path):
    """Weights of the form scale * q + min per 32-block (a dequantized Q4_1 file) come back exactly."""
    rng = np.random.default_rng(0)
    k, n = 256, 64
    w = _q4_1_weight(rng, k, n)
    model = _single_op_model("matmul", w, np.zeros(n, np.float32))
    report = QuantizeWeights(bits=4, algorithm="minmax", float_zero_points="input", min_elements=0)(model).counts
    assert report["float_zero_points_input"] == 1 and report["weight_rms_error_bp"] == 0
    ir.save(model, tmp_path / "m.onnx")
    x = rng.normal(0, 1, (4, k)).astype(np.float32)
    y = ort.InferenceSession(str(tmp_path / "m.onnx")).run(None, {"x": x})[0]
    np.testing.assert_allclose(y, x @ w, rtol=1e-5, atol=1e-5)


def test_split_float_zero_points_keep_q4_1_blocks_within_a_thirtieth_of_a_step(tmp_path):
    """The default split (integer zero point in MatMulNBits' fast kernel, the rest as one extra row of K per block,
    fed each block's sum) keeps on-grid weights within 1/30 of their column's largest step, where ONNX Runtime's
    integer zero points move a block by up to half a step; the graph reads x's block sums through one
    Reshape/ReduceSum/Concat and MatMulNBits sees K + K/32 rows with uint8 zero points."""
    rng = np.random.default_rng(0)
    k, n = 256, 64
    w = _q4_1_weight(rng, k, n, positive_block=False)  # as in a trained model's blocks of 32: all straddle zero
    largest_step = (w.max(0) - w.min(0)) / 15  # a column's largest block step is at most its whole range / 15
    errors = {}
    for algorithm in ("rtn", "minmax"):
        model = _single_op_model("matmul", w, np.zeros(n, np.float32), rows=k)
        report = QuantizeWeights(bits=4, accuracy_level=0, min_elements=0, algorithm=algorithm)(model).counts
        errors[algorithm] = np.abs(_weights_ort_multiplies_by(model, k, tmp_path, algorithm) - w)
        if algorithm == "minmax":
            assert report["float_zero_points_split"] == 1 and report["blocksum_inputs"] == 1
            assert [node.op_type for node in model.graph] == ["Reshape", "ReduceSum", "Concat", "MatMulNBits"]
            matmul = model.graph.node(3)
            assert matmul.attributes["K"].value == k + k // 32
            assert matmul.inputs[3].const_value.dtype == ir.DataType.UINT8
    assert (errors["minmax"] <= largest_step / 30 + 1e-6).all()
    assert errors["rtn"].max() > 10 * errors["minmax"].max(), (errors["rtn"].max(), errors["minmax"].max())


def test_auto_splits_only_weights_already_on_a_4_bit_grid(tmp_path):
    """``algorithm="auto"`` (the int4 default): a dequantized Q4_1 weight gets the exact float zero points (split:
    block sums, K + K/32, within 1/30 of a step), a weight on no grid (Gaussian, as a model trained in bf16) gets
    round-to-nearest with integer zero points and no extra nodes; a bf16-rounded Gaussian weight is on no grid
    either."""
    rng = np.random.default_rng(3)
    k, n = 256, 64
    on_grid = _q4_1_weight(rng, k, n, positive_block=False)
    gaussian = rng.normal(0, 0.02, (k, n)).astype(np.float32)
    bf16 = (gaussian.view(np.uint32) & 0xFFFF0000).view(np.float32)  # what a bf16 checkpoint holds
    for name, w, split in (("q4_1", on_grid, True), ("gaussian", gaussian, False), ("bf16", bf16, False)):
        model = _single_op_model("matmul", w, np.zeros(n, np.float32), rows=k)
        report = QuantizeWeights(bits=4, accuracy_level=0, min_elements=0, algorithm="auto")(model).counts
        ops = [node.op_type for node in model.graph]
        matmul = model.graph.node(len(ops) - 1)
        assert matmul.inputs[3].const_value.dtype == ir.DataType.UINT8, name  # the fast kernel's zero points
        if split:
            assert report["float_zero_points_split"] == 1 and ops == ["Reshape", "ReduceSum", "Concat", "MatMulNBits"]
            assert matmul.attributes["K"].value == k + k // 32
            error = np.abs(_weights_ort_multiplies_by(model, k, tmp_path, name) - w)
            assert (error <= (w.max(0) - w.min(0)) / 15 / 30 + 1e-6).all()
        else:
            assert report["float_zero_points_split"] == 0 and ops == ["MatMulNBits"], (name, ops)
            assert matmul.attributes["K"].value == k


def _chain_model(weights: list[np.ndarray]) -> ir.Model:
    """``y = x @ W1 @ W2 @ ...`` (square ``[K, K]`` weights)."""
    k = weights[0].shape[0]
    value = x = ir.Value(name="x", shape=ir.Shape([4, k]), type=ir.TensorType(ir.DataType.FLOAT))
    nodes, inits = [], []
    for i, w in enumerate(weights):
        const = ir.Value(name=f"w{i}", shape=ir.Shape(w.shape), type=ir.TensorType(ir.DataType.FLOAT))
        const.const_value = ir.tensor(w, name=f"w{i}")
        inits.append(const)
        nodes.append(ir.node("MatMul", [value, const], name=f"matmul{i}"))
        value = nodes[-1].outputs[0]
        value.name, value.type, value.shape = f"h{i}", ir.TensorType(ir.DataType.FLOAT), ir.Shape([4, k])
    value.name = "y"
    graph = ir.Graph([x], [value], nodes=nodes, initializers=inits, opset_imports={"": 20})
    return ir.Model(graph, ir_version=10)


@pytest.mark.parametrize(("grid_weights", "split"), [(2, True), (1, False)])
def test_auto_decides_for_the_whole_model_by_its_majority_of_weights(grid_weights, split):
    """A checkpoint dequantized from 4-bit blocks keeps some weights off the grid (llama.cpp files keep the LM head
    at 8 bits): ``auto`` gives every 4-bit weight float zero points when most are on a grid, none otherwise."""
    rng = np.random.default_rng(4)
    k = 128
    weights = [_q4_1_weight(rng, k, k, positive_block=False) for _ in range(grid_weights)]
    weights += [rng.normal(0, 0.02, (k, k)).astype(np.float32) for _ in range(3 - grid_weights)]
    model = _chain_model(weights)
    counts = QuantizeWeights(bits=4, min_elements=0, algorithm="auto")(model).counts
    assert counts["weights_on_4_bit_grid"] == grid_weights and counts["quantized"] == 3
    assert counts["float_zero_points_split"] == (3 if split else 0)
    assert sum(node.op_type == "ReduceSum" for node in model.graph) == (3 if split else 0)


def test_split_blocks_compute_the_product_with_int8_activations(tmp_path):
    """At the default ``accuracy_level`` 4 (int8 activation blocks, the block sums a block of their own) the split
    product of Q4_1 weights stays within 1% rms of ``x @ w``; Gaussian (off-grid) weights within the 4-bit
    round-to-nearest tolerance of ``test_each_form_computes_the_same_product``."""
    rng = np.random.default_rng(2)
    k, n = 256, 96
    x = rng.normal(0, 1, (4, k)).astype(np.float32)
    for w, tolerance in ((_q4_1_weight(rng, k, n), 0.01), (rng.normal(0, 0.02, (k, n)).astype(np.float32), 0.12)):
        model = _single_op_model("gemm", w, np.full(n, 0.5, np.float32))
        QuantizeWeights(bits=4, min_elements=0, algorithm="minmax")(model)
        ir.save(model, tmp_path / "m.onnx")
        y = ort.InferenceSession(str(tmp_path / "m.onnx")).run(None, {"x": x})[0]
        reference = x @ w + 0.5
        assert np.sqrt(((y - reference) ** 2).mean() / (reference**2).mean()) < tolerance


def test_one_blocksum_chain_per_input_shared_by_its_readers(retained_model, tmp_path):
    """On a tiny Llama, every reader of one activation shares one block-sum chain (q/k/v read one norm output,
    gate/up another), and the split model computes what MatMulNBits' float zero points compute: with float
    activations (``accuracy_level`` 0) its logits stay within 2% of their range of the float-zero-point model's
    (measured 0.9%; the tiny random model amplifies each layer's difference, Q4_1-free Gaussian weights)."""
    outputs = {}
    for mode in ("split", "input"):
        model = retained_model("llama")
        options = {"algorithm": "minmax", "float_zero_points": mode, "accuracy_level": 0, "min_elements": 0}
        [report] = run_pipeline(model, [PassSpec("quantize-weights", options)])
        outputs[mode] = _logits(model, tmp_path, mode)
        if mode == "split":
            # per layer: q/k/v's input, o's, gate/up's, down's; the LM head is 8-bit round-to-nearest (not split)
            readers = {n.inputs[0] for n in model.graph if n.op_type == "MatMulNBits"}
            assert report.counts["blocksum_inputs"] == 2 * 4 == len(readers) - 1
            assert report.counts["float_zero_points_split"] == LINEARS["llama"] - 1
    assert np.abs(outputs["split"] - outputs["input"]).max() / np.abs(outputs["input"]).max() < 0.02


def test_unnamed_matmuls_give_a_loadable_graph(tmp_path):
    """Nodes without names (legal ONNX) must not all become ``_MatMulNBits``: ORT refuses two nodes of one name."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal((64, 64), dtype=np.float32), f"w{i}") for i in range(2)]
    nodes = [helper.make_node("MatMul", ["x", f"w{i}"], [f"y{i}"]) for i in range(2)]
    graph = helper.make_graph(
        nodes,
        "unnamed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [1, 64]) for i in range(2)],
        weights,
    )
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    [report] = run_pipeline(model, [PassSpec("quantize-weights", {"bits": 4, "min_elements": 0})])
    assert report.counts["quantized"] == 2
    path = tmp_path / "q.onnx"
    ir.save(model, path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [o.shape for o in session.run(None, {"x": np.ones((1, 64), np.float32)})] == [(1, 64), (1, 64)]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_embedding_tables_become_8_bit_gathers(retained_model, tmp_path, arch):
    """Token (and GPT-2's position) tables are read as 8-bit blocks; rows come back within half a step."""
    reference = _logits(retained_model(arch), tmp_path, "fp32")
    model = retained_model(arch)
    tables = [
        n.inputs[0].const_value.numpy() for n in model.graph if n.op_type == "Gather" and n.inputs[0].is_initializer()
    ]
    [report] = run_pipeline(
        model, [PassSpec("quantize-weights", {"bits": 8, "accuracy_level": 0, "min_elements": 0, "embedding_bits": 8})]
    )
    assert report.counts["embeddings_quantized"] == len(tables) >= 1
    hist = op_histogram(model)
    assert hist["com.microsoft::GatherBlockQuantized"] == len(tables)
    float_tables = [n for n in model.graph if n.op_type == "Gather" and n.inputs[0].is_initializer()]
    assert not [n for n in float_tables if n.inputs[0].const_value.dtype == ir.DataType.FLOAT]
    quantized = _logits(model, tmp_path, "int8")
    assert np.abs(quantized - reference).max() / np.abs(reference).max() < 0.05


def test_embedding_tables_stay_float_by_default(retained_model):
    model = retained_model("llama")
    [report] = run_pipeline(model, [PassSpec("quantize-weights", {"min_elements": 0})])
    assert report.counts["embeddings_quantized"] == 0
    assert op_histogram(model)["com.microsoft::GatherBlockQuantized"] == 0


def test_gathered_rows_match_the_table_within_half_a_step(tmp_path):
    rng = np.random.default_rng(0)
    table = rng.normal(0, 0.05, (200, 64)).astype(np.float32)
    ids = ir.Value(name="ids", shape=ir.Shape([1, 5]), type=ir.TensorType(ir.DataType.INT64))
    data = ir.Value(name="table", shape=ir.Shape(table.shape), type=ir.TensorType(ir.DataType.FLOAT))
    data.const_value = ir.tensor(table, name="table")
    gather = ir.node("Gather", [data, ids])
    gather.outputs[0].name, gather.outputs[0].type = "rows", ir.TensorType(ir.DataType.FLOAT)
    graph = ir.Graph([ids], gather.outputs, nodes=[gather], initializers=[data], opset_imports={"": 20})
    model = ir.Model(graph, ir_version=10)
    assert QuantizeWeights(min_elements=0, embedding_bits=8)(model).counts["embeddings_quantized"] == 1
    ir.save(model, tmp_path / "g.onnx")
    picked = np.array([[0, 3, 77, 150, 199]], np.int64)
    rows = ort.InferenceSession(str(tmp_path / "g.onnx")).run(None, {"ids": picked})[0]
    blocks = table.reshape(200, 2, 32)
    half_step = ((blocks.max(-1) - blocks.min(-1)) / 255 / 2).repeat(32, axis=1)
    assert (np.abs(rows - table[picked]) <= half_step[picked] + 1e-6).all()


def test_quantizing_leaves_the_callers_logging_alone():
    """ORT's quantizer module configures the root logger at INFO on import; the pass must not pass that on.
    (In a fresh process: under pytest the root logger already has handlers, which makes basicConfig a no-op.)"""
    import subprocess
    import sys

    code = (
        "import logging; from qgraph.passes.quantize_weights import _ort_quantizer; _ort_quantizer(); "
        "root = logging.getLogger(); print(len(root.handlers), root.level)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["0", str(logging.WARNING)]

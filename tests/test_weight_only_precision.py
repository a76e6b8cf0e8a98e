"""``compile(precision="int8"|"int4")`` quantizes the weights (MatMulNBits) and keeps the model's predictions."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from transformers import AutoModelForCausalLM

from qgraph import QEFFAutoModelForCausalLM
from qgraph.errors import QGraphError
from qgraph.pipelines import QUANTIZATION_DEFAULTS
from tests.parity import MY_NAME, hf_greedy

NEW_TOKENS = 12
# max |logit error| / logits' spread on the prompt's last token; measured on the tiny seeded Llama: int8 ~0.01,
# int4 ~0.1 (4-bit blocks of 32 on a random 64-wide model)
TOLERANCE = {"int8": 0.03, "int4": 0.25}


@pytest.fixture(scope="module")
def llama(tiny_model_dir, cache_dir):
    directory = tiny_model_dir("llama")
    hf = AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager").eval()
    return hf, QEFFAutoModelForCausalLM.from_pretrained(str(directory), cache_dir=cache_dir, verbose=False)


def _prompt_logits(qg, ids: list[int]) -> np.ndarray:
    session = qg.artifact.load()
    session.reset(1)
    logits = session.run(np.array([ids]), np.arange(len(ids))[None])
    return logits[0, -1]


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_weight_only_precision_replaces_every_weight_matmul_and_stays_close_to_float32(llama, tokenizer, precision):
    hf, qg = llama
    qg.compile(prefill_seq_len=8, ctx_len=64, precision=precision)
    graph = onnx.load(str(qg.onnx_path), load_external_data=False).graph
    weights = {i.name for i in graph.initializer}
    assert [n.name for n in graph.node if n.op_type == "MatMul" and n.input[1] in weights] == []
    assert any(n.op_type == "MatMulNBits" for n in graph.node)

    ids = tokenizer(MY_NAME)["input_ids"]
    with torch.no_grad():
        reference = hf(torch.tensor([ids])).logits[0, -1].numpy()
    error = np.abs(_prompt_logits(qg, ids) - reference).max() / np.ptp(reference)
    assert error < TOLERANCE[precision], f"{precision}: logit error {error:.3f} of the logits' spread"


def _matmul_nbits(graph) -> tuple[dict[str, int], onnx.NodeProto, dict]:
    """Every MatMulNBits's attributes by name, the LM head's node (the MatMulNBits ``logits`` is computed from), and
    the graph's initializers."""
    producers = {o: n for n in graph.node for o in n.output}
    head = producers[graph.output[0].name]
    while head.op_type != "MatMulNBits":
        head = producers[head.input[0]]
    nodes = {n.name: {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in graph.node}
    initializers = {i.name: i for i in graph.initializer}
    return {k: v for k, v in nodes.items() if "bits" in v and "K" in v}, head, initializers


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_the_default_graph_is_the_measured_choice(llama, precision):
    """compile(precision=...) writes QUANTIZATION_DEFAULTS (the sweep's choice, README): the body's bits, block size,
    accuracy level and zero points, and the LM head's own bits."""
    _, qg = llama
    chosen = QUANTIZATION_DEFAULTS[precision]
    qg.compile(prefill_seq_len=8, ctx_len=64, precision=precision)
    graph = onnx.load(str(qg.onnx_path), load_external_data=False).graph
    nbits, head, initializers = _matmul_nbits(graph)
    body = {name: attrs for name, attrs in nbits.items() if name != head.name}
    assert body and {a["bits"] for a in body.values()} == {chosen["bits"]}
    assert {a["block_size"] for a in nbits.values()} == {chosen["block_size"]}
    assert {a.get("accuracy_level", 0) for a in nbits.values()} == {chosen["accuracy_level"]}
    assert nbits[head.name]["bits"] == chosen["head_bits"]
    has_zero_points = {len(n.input) > 3 and n.input[3] != "" for n in graph.node if n.name in nbits}
    assert has_zero_points == {not chosen["symmetric"]}
    if not chosen["symmetric"]:
        assert initializers[head.input[3]].data_type == onnx.TensorProto.UINT8  # integer zero points: the fast path
    producers = {o: n for n in graph.node for o in n.output}
    split = {n.name for n in graph.node if n.name in nbits and producers[n.input[0]].op_type == "Concat"}
    if chosen.get("algorithm", "rtn") == "auto":
        # the tiny model's seeded Gaussian weights are on no 4-bit grid: round-to-nearest, no block-sum chains
        assert split == set() and not any(n.op_type == "ReduceSum" for n in graph.node)
    elif chosen.get("algorithm", "rtn") != "rtn" and chosen.get("float_zero_points", "split") == "split":
        # float zero points split: every 4-bit node reads its input with the block sums appended (K + K / block)
        assert split == {name for name, attrs in nbits.items() if attrs["bits"] == 4}
        assert all(nbits[name]["K"] % (chosen["block_size"] + 1) == 0 for name in split), "K = k + k / block"


def test_quantization_options_reach_the_graph(llama):
    """The other configurations stay reachable: compile(quantization=...) overrides a default."""
    _, qg = llama
    head_bits = 12 - QUANTIZATION_DEFAULTS["int4"]["head_bits"]  # the other of 4 and 8
    qg.compile(prefill_seq_len=8, ctx_len=64, precision="int4", quantization={"head_bits": head_bits})
    nbits, head, _ = _matmul_nbits(onnx.load(str(qg.onnx_path), load_external_data=False).graph)
    assert nbits[head.name]["bits"] == head_bits
    assert {a["bits"] for name, a in nbits.items() if name != head.name} == {4}


def test_int8_keeps_the_greedy_tokens_of_the_float_model(llama, tokenizer):
    hf, qg = llama
    qg.compile(prefill_seq_len=8, ctx_len=64, precision="int8")
    result = qg.generate(tokenizer, [MY_NAME], generation_len=NEW_TOKENS, verbose=False)
    assert result.generated_ids == [hf_greedy(hf, tokenizer, MY_NAME, NEW_TOKENS)]


def test_a_precision_the_backend_does_not_have_is_refused_before_the_export(tiny_model_dir, tmp_path):
    qg = QEFFAutoModelForCausalLM.from_pretrained(str(tiny_model_dir("llama")), cache_dir=tmp_path, verbose=False)
    with pytest.raises(QGraphError, match=r"precision 'int3' is not supported by this backend; it accepts: float16"):
        qg.compile(prefill_seq_len=8, ctx_len=64, precision="int3")
    assert not any(tmp_path.rglob("*.onnx")), "nothing should have been exported"

"""The target-ready graph keeps the retained-state contract (qgraph.contract, docs/design.md)."""

from __future__ import annotations

import re

import onnx_ir as ir
import pytest

from qgraph import QEFFAutoModelForCausalLM

CTX_LEN = 64


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def target_graph(request, tiny_model_dir, cache_dir) -> ir.Model:
    qg = QEFFAutoModelForCausalLM.from_pretrained(
        str(tiny_model_dir(request.param)), cache_dir=cache_dir, verbose=False
    )
    qg.compile(prefill_seq_len=8, ctx_len=CTX_LEN)
    return ir.load(qg.onnx_path)


def test_no_attention_mask_input(target_graph):
    names = [v.name for v in target_graph.graph.inputs]
    assert "attention_mask" not in names
    assert names[:2] == ["input_ids", "position_ids"]


def test_no_concat_appends_to_the_kv_buffers(target_graph):
    pasts = [v for v in target_graph.graph.inputs if v.name.startswith("past_")]
    assert pasts
    for value in pasts:
        assert all(user.op_type != "Concat" for user, _ in value.uses()), value.name


def test_every_kv_buffer_has_static_ctx_len_and_a_retained_state_output(target_graph):
    inputs = {v.name: v for v in target_graph.graph.inputs if v.name.startswith("past_")}
    outputs = {v.name: v for v in target_graph.graph.outputs}
    assert all(re.fullmatch(r"past_(key|value)\.\d+", name) for name in inputs)
    layers = {int(name.split(".")[1]) for name in inputs}
    assert len(inputs) == 2 * len(layers)
    for name, value in inputs.items():
        retained = outputs[f"{name}_RetainedState"]
        assert value.shape[2] == CTX_LEN and isinstance(value.shape[2], int)
        assert retained.shape[2] == CTX_LEN
        assert [d if isinstance(d, int) else None for d in value.shape] == [
            d if isinstance(d, int) else None for d in retained.shape
        ]
    assert list(outputs)[0] == "logits"
    assert set(outputs) == {"logits"} | {f"{n}_RetainedState" for n in inputs}

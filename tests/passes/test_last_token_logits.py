"""last-token-logits: the LM head runs on each row's last valid token only; those logits equal the full graph's, the
pass refuses graphs without an LM head or without position_ids, is idempotent, and the ORT backend still matches HF."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from transformers import AutoModelForCausalLM

from qgraph import QEFFAutoModelForCausalLM
from qgraph.errors import GraphPatternError, QGraphError
from qgraph.pass_manager import PassSpec, run_pipeline
from qgraph.passes.last_token_logits import LastTokenLogits
from tests.parity import LONG_PROMPT, MY_NAME, NEW_TOKENS, hf_greedy
from tests.passes.conftest import run_twice

CTX = 32


@pytest.fixture(scope="module")
def exports(tiny_model_dir, cache_dir):
    paths = {}

    def vanilla(arch: str):
        if arch not in paths:
            qg = QEFFAutoModelForCausalLM.from_pretrained(str(tiny_model_dir(arch)), cache_dir=cache_dir, verbose=False)
            paths[arch] = qg.export()
        return paths[arch]

    return vanilla


def _retained(path) -> ir.Model:
    model = ir.load(path)
    run_pipeline(model, [PassSpec("kv-retained-state", {"ctx_len": CTX}), PassSpec("cleanup")])
    return model


def _run(model: ir.Model, tmp_path, name: str, ids: np.ndarray, pos: np.ndarray) -> np.ndarray:
    path = tmp_path / f"{name}.onnx"
    ir.save(model, path, external_data=f"{name}.onnx.data")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {"input_ids": ids, "position_ids": pos}
    for i in session.get_inputs():
        if i.name.startswith("past_"):
            feeds[i.name] = np.zeros([ids.shape[0], *i.shape[1:]], np.float32)
    return session.run(["logits"], feeds)[0]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("quantized", [False, True])
def test_logits_of_each_rows_last_token_are_unchanged(exports, tmp_path, arch, quantized):
    ids = np.array([[5, 9, 17, 33, 41, 2], [7, 8, 9, 0, 0, 0]], np.int64)
    pos = np.array([[0, 1, 2, 3, 4, 5], [0, 1, 2, -1, -1, -1]], np.int64)  # right padding marked -1
    before, after = _retained(exports(arch)), _retained(exports(arch))
    if quantized:  # the head may already be a MatMulNBits
        for model in (before, after):
            run_pipeline(model, [PassSpec("quantize-weights", {"bits": 8, "min_elements": 0})])
    [report] = run_pipeline(after, [PassSpec("last-token-logits")])
    assert report.counts["gathered"] == 1
    full = _run(before, tmp_path, "full", ids, pos)
    last = _run(after, tmp_path, "last", ids, pos)
    assert last.shape == (2, 1, full.shape[-1])
    np.testing.assert_allclose(last[:, 0], full[[0, 1], [5, 2]], rtol=1e-5, atol=1e-5)
    one = _run(after, tmp_path, "decode", ids[:, :1], pos[:, :1])  # decode shape is unchanged
    assert one.shape == (2, 1, full.shape[-1])


def test_needs_the_retained_state_contract(exports):
    with pytest.raises(GraphPatternError, match="position_ids"):
        run_pipeline(ir.load(exports("llama")), [PassSpec("last-token-logits")])


def test_refuses_a_graph_without_lm_head():
    pos = ir.Value(name="position_ids", shape=ir.Shape([1, 4]), type=ir.TensorType(ir.DataType.INT64))
    node = ir.node("Cast", [pos], {"to": ir.DataType.FLOAT})
    node.outputs[0].name = "logits"
    model = ir.Model(ir.Graph([pos], node.outputs, nodes=[node], opset_imports={"": 20}), ir_version=10)
    with pytest.raises(GraphPatternError, match="no LM head"):
        run_pipeline(model, [PassSpec("last-token-logits")])


def test_idempotent(exports):
    model = _retained(exports("gpt2"))
    assert run_twice(LastTokenLogits(), model).counts["gathered"] == 1


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_ort_backend_with_the_pass_matches_hf_greedy(tiny_model_dir, cache_dir, tokenizer, tmp_path, arch):
    pipeline = tmp_path / "last.json"
    pipeline.write_text('[{"name": "kv-retained-state", "options": {"ctx_len": 64}}, "last-token-logits", "cleanup"]')
    directory = tiny_model_dir(arch)
    hf = AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager").eval()
    qg = QEFFAutoModelForCausalLM.from_pretrained(str(directory), cache_dir=cache_dir, verbose=False)
    qg.compile(prefill_seq_len=8, ctx_len=64, batch_size=2, passes=str(pipeline))
    prompts = [MY_NAME, LONG_PROMPT]  # two lengths, the long one in two prefill chunks
    result = qg.generate(tokenizer, prompts, generation_len=NEW_TOKENS, verbose=False)
    assert result.generated_ids == [hf_greedy(hf, tokenizer, p) for p in prompts]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_positions_keep_the_last_tokens_of_each_row_for_verification(exports, tmp_path, arch):
    """``positions=4`` (num_speculative_tokens=3): logits ``[b, min(s, 4), V]``, each row's last valid token last."""
    ids = np.array([[5, 9, 17, 33, 41, 2], [7, 8, 9, 0, 0, 0]], np.int64)
    pos = np.array([[0, 1, 2, 3, 4, 5], [0, 1, 2, -1, -1, -1]], np.int64)
    before, after = _retained(exports(arch)), _retained(exports(arch))
    [report] = run_pipeline(after, [PassSpec("last-token-logits", {"positions": 4})])
    assert report.counts["gathered"] == 1
    assert after.metadata_props["qgraph.logits_positions"] == "4"
    full = _run(before, tmp_path, "full", ids, pos)
    kept = _run(after, tmp_path, "kept", ids, pos)
    assert kept.shape == (2, 4, full.shape[-1])
    np.testing.assert_allclose(kept[0], full[0, 2:6], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(kept[1, 1:], full[1, 0:3], rtol=1e-5, atol=1e-5)  # 3 real tokens: the last 3
    short = _run(after, tmp_path, "short", ids[:, :2], pos[:, :2])  # s = 2 < 4: two positions
    assert short.shape == (2, 2, full.shape[-1])
    one = _run(after, tmp_path, "decode", ids[:, :1], pos[:, :1])  # decode stays [b, 1, V]
    assert one.shape == (2, 1, full.shape[-1])


def test_positions_must_be_a_positive_integer(exports):
    with pytest.raises((QGraphError, ValueError), match="positions must be an integer >= 1"):
        run_pipeline(_retained(exports("gpt2")), [PassSpec("last-token-logits", {"positions": 0})])


def test_the_pipeline_keeps_k_plus_one_positions_for_num_speculative_tokens():
    from qgraph.backend_api import CompileOptions
    from qgraph.compiler import get_backend

    for backend in ("ort", "ai100"):
        specs = get_backend(backend).pipeline(CompileOptions(num_speculative_tokens=5))
        assert [s.options for s in specs if s.name == "last-token-logits"] == [{"positions": 6}]
        plain = get_backend(backend).pipeline(CompileOptions())
        assert [s.options for s in plain if s.name == "last-token-logits"] == [{}]

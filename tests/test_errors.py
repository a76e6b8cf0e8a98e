"""Bad input gets a message a user can act on, not a traceback from deep inside."""

from __future__ import annotations

import onnx_ir as ir
import pytest

from qgraph import QEFFAutoModelForCausalLM
from qgraph.cli import main
from qgraph.errors import GraphPatternError, ModelNotFoundError, PromptTooLongError, UnknownNameError
from qgraph.pass_manager import PassSpec, run_pipeline
from tests.parity import LONG_PROMPT


@pytest.fixture(scope="module")
def tiny_llama(tiny_model_dir, cache_dir):
    return QEFFAutoModelForCausalLM.from_pretrained(str(tiny_model_dir("llama")), cache_dir=cache_dir, verbose=False)


def test_missing_model_path_names_the_path(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelNotFoundError, match="no-such-model.*does not exist"):
        QEFFAutoModelForCausalLM.from_pretrained(str(missing))


def test_unreachable_hub_id_says_it_could_not_load():
    with pytest.raises(ModelNotFoundError, match="could not load model 'qgraph-test/does-not-exist'"):
        QEFFAutoModelForCausalLM.from_pretrained("qgraph-test/does-not-exist")


def test_cli_reports_missing_model_without_traceback(tmp_path, capsys):
    assert main(["infer", "--model", str(tmp_path / "nope"), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: model path") and "Traceback" not in err


def test_prompt_longer_than_ctx_len_is_refused(tiny_llama, tokenizer):
    tiny_llama.compile(prefill_seq_len=4, ctx_len=8)
    with pytest.raises(PromptTooLongError, match=r"prompt 0 has 17 tokens .* ctx_len=8"):
        tiny_llama.generate(tokenizer, [LONG_PROMPT], verbose=False)


def test_unknown_backend_lists_known_ones(tiny_llama):
    with pytest.raises(UnknownNameError, match="unknown backend 'tpu9000'; known backends: .*ort"):
        tiny_llama.compile(backend="tpu9000")


def test_unknown_pass_lists_known_ones(tiny_llama):
    with pytest.raises(UnknownNameError, match="unknown pass 'fuse-everything'; known passes: .*kv-retained-state"):
        tiny_llama.compile(passes=["kv-retained-state", "fuse-everything"])


def test_generate_before_compile_says_what_to_do(tiny_model_dir, tokenizer, cache_dir):
    fresh = QEFFAutoModelForCausalLM.from_pretrained(str(tiny_model_dir("llama")), cache_dir=cache_dir, verbose=False)
    with pytest.raises(Exception, match=r"call model.compile\(...\) before"):
        fresh.generate(tokenizer, ["hi"])


def _graph_without_kv() -> ir.Model:
    x = ir.Value(name="input_ids", shape=ir.Shape(["b", "s"]), type=ir.TensorType(ir.DataType.INT64))
    m = ir.Value(name="attention_mask", shape=ir.Shape(["b", "t"]), type=ir.TensorType(ir.DataType.INT64))
    p = ir.Value(name="position_ids", shape=ir.Shape(["b", "s"]), type=ir.TensorType(ir.DataType.INT64))
    node = ir.node("Add", [x, p])
    node.outputs[0].name, node.outputs[0].shape, node.outputs[0].type = "logits", x.shape, x.type
    graph = ir.Graph([x, m, p], node.outputs, nodes=[node], opset_imports={"": 20}, name="no_kv")
    return ir.Model(graph, ir_version=10)


def test_kv_pass_on_a_graph_without_kv_names_what_is_missing():
    with pytest.raises(GraphPatternError, match=r"no past_key_values\.\{i\}\.key\|value inputs"):
        run_pipeline(_graph_without_kv(), [PassSpec("kv-retained-state", {"ctx_len": 16})])


def test_kv_pass_on_a_past_input_without_append_names_its_consumers():
    model = _graph_without_kv()
    past = ir.Value(
        name="past_key_values.0.key", shape=ir.Shape(["b", 2, "p", 4]), type=ir.TensorType(ir.DataType.FLOAT)
    )
    model.graph.inputs.append(past)
    node = ir.node("Transpose", [past], attributes={"perm": [0, 1, 3, 2]})
    node.outputs[0].name = "present.0.key"
    model.graph.append(node)
    model.graph.outputs.append(node.outputs[0])
    with pytest.raises(GraphPatternError, match=r"past_key_values\.0\.key is not appended .* consumers: Transpose"):
        run_pipeline(model, [PassSpec("kv-retained-state", {"ctx_len": 16})])


def test_cli_optimize_with_an_unknown_pass_fails_cleanly(tmp_path, capsys):
    ir.save(_graph_without_kv(), tmp_path / "g.onnx")
    assert main(["optimize", str(tmp_path / "g.onnx"), "-o", str(tmp_path / "o.onnx"), "--passes", "nope"]) == 2
    assert "unknown pass 'nope'" in capsys.readouterr().err


def test_cli_optimize_on_an_unconvertible_graph_fails_cleanly(tmp_path, capsys):
    ir.save(_graph_without_kv(), tmp_path / "g.onnx")
    code = main(["optimize", str(tmp_path / "g.onnx"), "-o", str(tmp_path / "o.onnx"), "--passes", "kv-retained-state"])
    assert code == 2
    assert "kv-retained-state" in capsys.readouterr().err
    assert not (tmp_path / "o.onnx").exists()

"""Backends and passes are plugins: a separately installed distribution is found through its entry points and run;
a pass written for onnx-graphsurgeon joins a pipeline through the adapter."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper
from transformers import AutoModelForCausalLM

from qgraph import QEFFAutoModelForCausalLM
from qgraph.cli import main
from qgraph.compiler import get_backend
from qgraph.errors import QGraphError, UnknownNameError
from qgraph.pass_manager import PassSpec, op_histogram, run_pipeline
from qgraph.registry import backend_registry, pass_registry
from tests.parity import LONG_PROMPT, MY_NAME, NEW_TOKENS, hf_greedy

gs = pytest.importorskip("onnx_graphsurgeon", reason="onnx-graphsurgeon (a dev dependency) is not installed")

TOY_PLUGIN = Path(__file__).parent / "fixtures" / "toy_plugin"
TOY_DIST = "qgraph-toy-plugin"
N_LAYERS = 2


@pytest.fixture(scope="module")
def toy_site(tmp_path_factory) -> Path:
    """The toy plugin installed (a real wheel build and install) into a directory of its own."""
    source = tmp_path_factory.mktemp("toy-src") / "toy_plugin"
    shutil.copytree(TOY_PLUGIN, source)  # builds write into the source tree: keep them out of the repository
    site = tmp_path_factory.mktemp("toy-site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-q", "--target", site, source],
        check=True,
        capture_output=True,
    )
    assert list(site.glob("qgraph_toy_plugin-*.dist-info/entry_points.txt"))
    return site


@pytest.fixture
def toy_installed(toy_site, monkeypatch):
    """The plugin's site directory on ``sys.path`` for one test, as if pip had installed it into the environment."""
    monkeypatch.syspath_prepend(str(toy_site))
    yield
    sys.modules.pop("qgraph_toy_plugin", None)


def test_installed_plugin_is_discovered_beside_the_builtins(toy_installed):
    backends, passes = backend_registry(), pass_registry()
    assert {"ort", "ai100", "toy"} <= set(backends.names())
    assert {"kv-retained-state", "cleanup", "toy-stamp", "pow2-to-mul"} <= set(passes.names())
    assert backends.entries["toy"].distribution == TOY_DIST
    assert passes.entries["pow2-to-mul"].distribution == TOY_DIST
    assert backends.entries["ort"].distribution == "qgraph"
    assert backends.get("toy").capabilities.dtypes == frozenset({"float32"})


def test_plugin_is_absent_when_not_installed():
    assert "toy" not in backend_registry()
    assert "pow2-to-mul" not in pass_registry()


def test_cli_lists_plugins_beside_builtins(toy_installed, capsys):
    assert main(["backends"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert {"ort", "ai100", "toy"} <= set(lines)
    assert f"[{TOY_DIST}]" in lines["toy"] and "kernels=[]" in lines["toy"]
    assert "[qgraph]" in lines["ai100"] and "com.qti.aisw.onnx::CustomRMSNorm[float16,float32]" in lines["ai100"]
    assert main(["passes"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert f"[{TOY_DIST}]" in lines["pow2-to-mul"] and "Pow(x, 2)" in lines["pow2-to-mul"]
    assert f"[{TOY_DIST}]" in lines["toy-stamp"]
    assert "[qgraph]" in lines["kv-retained-state"]


def test_unknown_backend_names_the_known_ones(toy_installed):
    with pytest.raises(UnknownNameError) as info:
        get_backend("tpu")
    assert "unknown backend 'tpu'" in str(info.value)
    assert all(name in str(info.value) for name in ("ai100", "ort", "toy"))


def test_plugin_backend_runs_its_own_pipeline_and_matches_hf(toy_installed, tiny_model_dir, cache_dir, tokenizer):
    directory = tiny_model_dir("llama")
    qg = QEFFAutoModelForCausalLM.from_pretrained(str(directory), cache_dir=cache_dir, verbose=False)
    qg.compile(backend="toy", prefill_seq_len=8, ctx_len=64, batch_size=2)
    reports = {r["name"]: r for r in qg.artifact.reports}
    assert reports["pow2-to-mul"]["counts"]["rewritten"] == 2 * N_LAYERS + 1  # one x^2 per RMSNorm
    assert reports["toy-stamp"]["counts"] == {"stamped": 1}
    ready = ir.load(qg.onnx_path)
    assert ready.metadata_props["qgraph_toy_plugin.stamp"] == "toy"
    assert "Pow" not in op_histogram(ready)
    hf = AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager").eval()
    result = qg.generate(tokenizer, [MY_NAME, LONG_PROMPT], generation_len=NEW_TOKENS, verbose=False)
    assert result.generated_ids == [hf_greedy(hf, tokenizer, p) for p in (MY_NAME, LONG_PROMPT)]


# -- the onnx-graphsurgeon adapter, without installing anything --------------------------------------------------


@pytest.fixture
def toy_module(monkeypatch):
    monkeypatch.syspath_prepend(str(TOY_PLUGIN))
    import qgraph_toy_plugin

    yield qgraph_toy_plugin
    sys.modules.pop("qgraph_toy_plugin", None)


def _ort_outputs(model: ir.Model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    proto = ir.to_proto(ir.external_data.load_to_model(model))
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _retained_state_feeds(model: ir.Model, batch: int = 1, seq: int = 5) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    feeds = {
        "input_ids": rng.integers(4, 100, (batch, seq)).astype(np.int64),
        "position_ids": np.arange(seq, dtype=np.int64)[None].repeat(batch, 0),
    }
    for value in model.graph.inputs:
        if value.name.startswith("past_"):
            _, heads, ctx, dim = value.shape
            feeds[value.name] = np.zeros((batch, heads, ctx, dim), np.float32)
    return feeds


def test_graphsurgeon_pass_registered_by_hand_runs_in_a_pipeline(toy_module, tiny_model_dir, cache_dir):
    qg = QEFFAutoModelForCausalLM.from_pretrained(str(tiny_model_dir("llama")), cache_dir=cache_dir, verbose=False)
    registry = pass_registry()
    registry.add("pow2-to-mul", toy_module.pow2_to_mul)
    model = ir.load(qg.export())
    run_pipeline(model, [PassSpec("kv-retained-state", {"ctx_len": 32})], registry)
    feeds = _retained_state_feeds(model)
    before = _ort_outputs(model, feeds)

    reports = run_pipeline(model, [PassSpec("pow2-to-mul"), PassSpec("cleanup")], registry)

    assert reports[0].counts == {"rewritten": 2 * N_LAYERS + 1, "nodes_delta": 0}
    assert reports[0].op_delta == {"Mul": 2 * N_LAYERS + 1, "Pow": -(2 * N_LAYERS + 1)}
    after = _ort_outputs(model, feeds)
    for b, a in zip(before, after, strict=True):
        np.testing.assert_array_equal(a, b)  # x*x is exactly pow(x, 2)


def _identity_into_function_model() -> onnx.ModelProto:
    """x -> Identity -> Double (a local function, Add(x, x)) -> y, with a metadata entry."""
    double = helper.make_function(
        "custom", "Double", ["x"], ["y"], [helper.make_node("Add", ["x", "x"], ["y"])], [helper.make_opsetid("", 20)]
    )
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["t"]), helper.make_node("Double", ["t"], ["y"], domain="custom")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    model = helper.make_model(
        graph,
        functions=[double],
        opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid("custom", 1)],
    )
    helper.set_model_props(model, {"origin": "test"})
    return model


def drop_identity(graph, only_op: str = "Identity"):
    """The classic graph-surgeon rewrite: bypass Identity nodes, let cleanup() remove them."""
    removed = 0
    for node in graph.nodes:
        if node.op == only_op:
            source = node.inputs[0]
            for consumer in list(node.outputs[0].outputs):
                consumer.inputs = [source if t is node.outputs[0] else t for t in consumer.inputs]
            node.outputs.clear()
            removed += 1
    return {"removed": removed}


def test_graphsurgeon_pass_keeps_functions_and_metadata_and_takes_options():
    from qgraph.gs_adapter import graphsurgeon_pass

    registry = pass_registry()
    registry.add("drop-identity", graphsurgeon_pass(drop_identity, name="drop-identity"))
    model = ir.from_proto(_identity_into_function_model())
    reports = run_pipeline(model, [PassSpec("drop-identity", {"only_op": "Identity"})], registry)
    assert reports[0].counts == {"removed": 1, "nodes_delta": -1}
    assert reports[0].modified
    assert [n.op_type for n in model.graph] == ["Double"]
    assert ("custom", "Double", "") in model.functions
    assert model.metadata_props["origin"] == "test"
    onnx.checker.check_model(ir.to_proto(model), full_check=True)
    (y,) = _ort_outputs(model, {"x": np.array([1.5, -2.0], np.float32)})
    np.testing.assert_array_equal(y, [3.0, -4.0])
    assert graphsurgeon_pass(drop_identity, name="x").summary.startswith("The classic graph-surgeon rewrite")


def test_graphsurgeon_pass_with_a_wrong_return_type_is_refused():
    from qgraph.gs_adapter import graphsurgeon_pass

    @graphsurgeon_pass(name="bad")
    def bad(graph):
        return 3

    with pytest.raises(QGraphError, match="returned int; expected None, a dict of counts or a gs.Graph"):
        bad()(ir.from_proto(_identity_into_function_model()))

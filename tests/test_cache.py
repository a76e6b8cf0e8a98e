"""Artifacts are keyed by everything that shaped them and published atomically."""

from __future__ import annotations

import sys

import pytest

from qgraph import QEFFAutoModelForCausalLM
from qgraph.cache import is_complete, publish
from qgraph.pass_manager import PassSpec


@pytest.fixture(scope="module")
def tiny_gpt2(tiny_model_dir, cache_dir):
    return QEFFAutoModelForCausalLM.from_pretrained(str(tiny_model_dir("gpt2")), cache_dir=cache_dir, verbose=False)


def test_an_unchanged_request_reuses_the_artifact(tiny_gpt2):
    first = tiny_gpt2.compile(prefill_seq_len=8, ctx_len=40)
    again = tiny_gpt2.compile(prefill_seq_len=8, ctx_len=40)
    assert first == again and tiny_gpt2.artifact.reused


def test_every_shaping_option_changes_the_key(tiny_gpt2):
    base = tiny_gpt2.compile(prefill_seq_len=8, ctx_len=40)
    variants = {
        tiny_gpt2.compile(prefill_seq_len=4, ctx_len=40),
        tiny_gpt2.compile(prefill_seq_len=8, ctx_len=48),
        tiny_gpt2.compile(prefill_seq_len=8, ctx_len=40, batch_size=2),
        tiny_gpt2.compile(prefill_seq_len=8, ctx_len=40, passes=["kv-retained-state"]),
        tiny_gpt2.compile(prefill_seq_len=8, ctx_len=40, session_options={"intra_op_num_threads": 1}),
    }
    assert base not in variants and len(variants) == 5


def test_an_option_the_backend_ignores_does_not_change_the_key(tiny_gpt2):
    assert tiny_gpt2.compile(prefill_seq_len=8, ctx_len=40) == tiny_gpt2.compile(
        prefill_seq_len=8, ctx_len=40, num_cores=4
    )


def test_different_weights_get_a_different_export(tiny_model_dir, cache_dir, tiny_gpt2):
    import torch

    other = QEFFAutoModelForCausalLM.from_pretrained(str(tiny_model_dir("gpt2")), cache_dir=cache_dir, verbose=False)
    with torch.no_grad():
        next(other.model.parameters()).add_(1.0)
    assert other.source_key != tiny_gpt2.source_key


def test_a_failed_write_leaves_no_directory(tmp_path):
    target = tmp_path / "artifact"
    with pytest.raises(RuntimeError), publish(target) as tmp:
        (tmp / "model.onnx").write_text("half")
        raise RuntimeError("interrupted")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_a_published_directory_is_complete(tmp_path):
    target = tmp_path / "artifact"
    with publish(target) as tmp:
        (tmp / "model.onnx").write_text("whole")
    assert is_complete(target) and (target / "model.onnx").read_text() == "whole"


def test_an_edited_pass_gets_a_new_artifact(tmp_path, monkeypatch):
    """The key covers the code of every pass in the pipeline: an edit never reuses a graph the old code wrote."""
    import importlib.util

    from qgraph.backend_api import CompileOptions
    from qgraph.compiler import artifact_key, get_backend
    from qgraph.registry import Registry

    source = tmp_path / "my_pass.py"

    def key_with(body: str) -> str:
        source.write_text(f"class MyPass:\n    def call(self, model):\n        {body}\n")
        spec = importlib.util.spec_from_file_location("my_pass", source)
        module = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, "my_pass", module)
        spec.loader.exec_module(module)
        registry = Registry("pass")
        registry.add("my-pass", module.MyPass)
        return artifact_key("src", get_backend("ort"), [PassSpec("my-pass")], CompileOptions(), registry)

    assert key_with("return model") == key_with("return model")
    assert key_with("return model") != key_with("return None")


def test_an_edited_helper_beside_a_pass_gets_a_new_artifact(tmp_path, monkeypatch):
    """A pass's package counts whole: editing a helper module it imports changes the key as editing it would."""
    import importlib

    from qgraph.backend_api import CompileOptions
    from qgraph.compiler import artifact_key, get_backend
    from qgraph.registry import Registry

    package = tmp_path / "my_passes"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "helpers.py").write_text("SCALE = 1\n")
    (package / "scale.py").write_text("from my_passes.helpers import SCALE\n\nclass ScalePass:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("my_passes", "my_passes.helpers", "my_passes.scale"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    registry = Registry("pass")
    registry.add("scale", importlib.import_module("my_passes.scale").ScalePass)

    def key() -> str:
        return artifact_key("src", get_backend("ort"), [PassSpec("scale")], CompileOptions(), registry)

    before = key()
    (package / "helpers.py").write_text("SCALE = 2\n")
    assert key() != before


def test_the_derived_pipeline_is_remembered_and_equals_the_backends(tmp_path, monkeypatch):
    """Deriving a pipeline imports every pass; a cached compile reads it back instead, and gets the same one."""
    from qgraph.backend_api import CompileOptions
    from qgraph.compiler import default_pipeline, get_backend

    backend = get_backend("ort")
    for precision in ("float32", "int4"):
        options = CompileOptions(precision=precision)
        derived = backend.pipeline(options)
        assert default_pipeline(backend, options, tmp_path) == derived
        monkeypatch.setattr(type(backend), "pipeline", lambda self, o: pytest.fail("derived again"))
        assert default_pipeline(backend, options, tmp_path) == derived
        monkeypatch.undo()
    ai100 = get_backend("ai100")  # its pipeline carries an object option (its own RMSNorm lowering): never stored
    assert default_pipeline(ai100, CompileOptions(), tmp_path) == ai100.pipeline(CompileOptions())
    assert not list((tmp_path / "pipelines").glob("ai100-*"))

"""Artifacts are keyed by everything that shaped them and published atomically."""

from __future__ import annotations

import pytest

from qgraph import QEFFAutoModelForCausalLM
from qgraph.cache import is_complete, publish


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

"""The ORT session updates each KV buffer in place (one OrtValue bound as the scatter's input and output) when the
graph allows it, and gives exactly the tokens of the two-buffer ping-pong it replaces."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from qgraph import QEFFAutoModelForCausalLM
from qgraph.backends.ort import graph_facts
from qgraph.errors import QGraphError
from qgraph.runtime import greedy_generate
from tests.parity import LONG_PROMPT, MY_NAME


@pytest.fixture(scope="module")
def compiled(tiny_model_dir, cache_dir):
    qg = QEFFAutoModelForCausalLM.from_pretrained(str(tiny_model_dir("llama")), cache_dir=cache_dir, verbose=False)
    qg.compile(prefill_seq_len=8, ctx_len=64, batch_size=2)
    return qg


def test_retained_state_graph_is_updated_in_place(compiled):
    session = compiled.artifact.load()
    assert session.in_place
    session.reset(2)
    assert all(a is b for a, b in zip(session._current, session._next, strict=True)), "one buffer per state"


def test_in_place_and_ping_pong_give_the_same_tokens(compiled, tokenizer):
    rows = [tokenizer(p)["input_ids"] for p in (MY_NAME, LONG_PROMPT)]  # two lengths, two prefill chunks
    in_place = compiled.artifact.load()
    ping_pong = compiled.artifact.load()
    ping_pong.in_place = False
    a, _, _ = greedy_generate(in_place, rows, 2, 20, set())
    b, _, _ = greedy_generate(ping_pong, rows, 2, 20, set())
    assert a == b
    again, _, _ = greedy_generate(in_place, rows, 2, 20, set())  # the reused buffers' old contents do not leak
    assert again == a


def test_a_generation_after_a_longer_one_reuses_the_buffers_and_still_matches_hf(compiled, tiny_model_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    from tests.parity import hf_greedy

    hf = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama"), attn_implementation="eager").eval()
    session = compiled.artifact.load()
    long_rows = [tokenizer(LONG_PROMPT)["input_ids"]] * 2
    greedy_generate(session, long_rows, 2, 40, set())  # fills slots well past the next prompt's length
    buffers = list(session._current)
    short, _, _ = greedy_generate(session, [tokenizer(MY_NAME)["input_ids"]], 2, 24, set())
    assert all(a is b for a, b in zip(buffers, session._current, strict=True)), "same batch size: buffers reused"
    assert short == [hf_greedy(hf, tokenizer, MY_NAME)]


def test_a_second_reader_of_a_buffer_forbids_sharing(compiled, tmp_path):
    model = onnx.load(str(compiled.onnx_path), load_external_data=False)
    name = next(i.name for i in model.graph.input if i.name.startswith("past_"))
    model.graph.node.append(onnx.helper.make_node("Identity", [name], ["extra_reader"]))
    model.graph.output.append(onnx.helper.make_tensor_value_info("extra_reader", onnx.TensorProto.FLOAT, None))
    path = tmp_path / "two_readers.onnx"
    onnx.save(model, str(path))
    assert graph_facts(compiled.onnx_path)["in_place"]
    assert not graph_facts(path)["in_place"]


def test_the_graph_facts_are_recorded_at_compile(compiled):
    """Loading reads them from the settings instead of parsing the graph again (which costs the memory of onnx)."""
    settings = json.loads((compiled.artifact.directory / "ort_settings.json").read_text())
    assert settings["graph"] == graph_facts(compiled.onnx_path)


def test_a_position_outside_the_buffers_is_refused_not_clamped(compiled):
    """The fused attention derives write slots from positions; one past ctx_len must fail loudly, never land in
    another slot."""
    session = compiled.artifact.load()
    session.reset(1)
    with pytest.raises(QGraphError, match="does not fit ctx_len 64"):
        session.run(np.array([[5]]), np.array([[64]]))
    with pytest.raises(QGraphError, match="does not fit ctx_len 64"):
        session.run(np.zeros((1, 65), np.int64), np.arange(65)[None])


def test_all_padding_columns_change_nothing(compiled):
    """Columns that are padding in every row give the same logits and the same next step as no such columns."""
    ids = np.array([[5, 9, 0, 0], [7, 0, 0, 0]])
    pos = np.array([[0, 1, -1, -1], [0, -1, -1, -1]])
    padded, trimmed = compiled.artifact.load(), compiled.artifact.load()
    padded.reset(2)
    trimmed.reset(2)
    np.testing.assert_array_equal(padded.run(ids, pos), trimmed.run(ids[:, :2], pos[:, :2]))
    step_ids, step_pos = np.array([[11], [12]]), np.array([[2], [1]])
    np.testing.assert_array_equal(padded.run(step_ids, step_pos), trimmed.run(step_ids, step_pos))


def test_run_logits_are_the_callers_and_run_transient_gives_the_same(compiled):
    """``run``'s logits stay as they were after later runs (prefill keeps a chunk's rows across the next chunks);
    ``run_transient`` (the decode loop's, no copy) gives the same logits, and its inputs, bound once and rewritten in
    place, are read anew at each run."""
    session = compiled.artifact.load()
    session.reset(2)
    prompt_ids, prompt_pos = np.array([[5, 9], [7, 3]]), np.array([[0, 1], [0, 1]])
    kept = session.run(prompt_ids, prompt_pos)
    before = kept.copy()
    steps = [(np.array([[11], [12]]), np.array([[2], [2]])), (np.array([[4], [8]]), np.array([[3], [3]]))]
    transient = [session.run_transient(ids, pos)[:, -1].copy() for ids, pos in steps]
    np.testing.assert_array_equal(kept, before)
    reference = compiled.artifact.load()
    reference.reset(2)
    reference.run(prompt_ids, prompt_pos)
    for (ids, pos), logits in zip(steps, transient, strict=True):
        np.testing.assert_array_equal(logits, reference.run(ids, pos)[:, -1])
    assert not np.array_equal(transient[0], transient[1]), "each step's own tokens, not the first step's"

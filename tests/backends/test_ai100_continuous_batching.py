"""The Cloud AI 100 bundle for continuous batching (``full_batch_size``): QEfficient's ``batch_index`` protocol, and
its graph on ORT through the engine gives HF's greedy tokens for requests joining and leaving the slots."""

from __future__ import annotations

import json

import onnx
import pytest

from qgraph.decoding import GenerationOptions
from qgraph.engine import Engine
from qgraph.request import Request
from tests.bundle_on_ort import ContinuousBatchingBundleSession
from tests.parity import hf_greedy
from tests.test_engine import CHUNK, SLOTS, mixed_requests, submit_from_threads

CTX_LEN = 64


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def cb_bundle(request, qeff_model):
    qg = qeff_model(request.param)
    directory = qg.compile(backend="ai100", prefill_seq_len=CHUNK, ctx_len=CTX_LEN, full_batch_size=SLOTS)
    return qg, directory


def test_the_bundle_follows_qefficients_continuous_batching_protocol(cb_bundle):
    _, directory = cb_bundle
    specs = json.loads((directory / "specializations.json").read_text())["specializations"]
    fbs = str(SLOTS)
    assert specs == [
        {"batch_size": "1", "seq_len": str(CHUNK), "ctx_len": str(CTX_LEN), "full_batch_size": fbs},
        {"batch_size": fbs, "seq_len": "1", "ctx_len": str(CTX_LEN), "full_batch_size": fbs},
    ]
    graph = onnx.load(str(directory / "model.onnx"), load_external_data=False).graph
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in graph.input}
    assert dims["batch_index"] == ["batch_size", 1]
    assert dims["input_ids"] == ["batch_size", "seq_len"]
    kv = [d for name, d in dims.items() if name.startswith("past_")]
    assert kv and all(d[0] == "full_batch_size" and d[2] == "ctx_len" for d in kv)


def test_the_bundle_graph_through_the_engine_gives_hf_greedy_for_24_requests(cb_bundle, tokenizer, tmp_path):
    qg, directory = cb_bundle
    session = ContinuousBatchingBundleSession(directory, tmp_path)
    engine = Engine(session, SLOTS)
    work = mixed_requests()
    options = {n: GenerationOptions(max_new_tokens=n, eos_token_ids=frozenset({3})) for _, n in work}
    handles = submit_from_threads(
        lambda p, n: engine.submit(Request(tokenizer(p)["input_ids"], options[n], CTX_LEN)), work
    )
    got = [h.result(timeout=300).generated_ids for h in handles]
    engine.close()
    assert got == [hf_greedy(qg.model, tokenizer, p, n) for p, n in work]


def test_generate_on_the_sdk_runtime_runs_the_engine_with_batch_index(qeff_model, tokenizer, monkeypatch, tmp_path):
    """The SDK session (against the stand-in SDK, which runs the program's graph on ORT) binds batch_index."""
    import sys

    from tests.backends import fake_qaic

    for name, module in fake_qaic.modules().items():
        monkeypatch.setitem(sys.modules, name, module)
    fake_qaic.PROGRAMS.clear()
    qg = qeff_model("llama")
    compiler = fake_qaic.write_fake_compiler(tmp_path)
    qg.compile(backend="ai100", prefill_seq_len=CHUNK, ctx_len=CTX_LEN, full_batch_size=SLOTS, compiler=str(compiler))
    prompts = [p for p, _ in mixed_requests(6)]
    result = qg.generate(tokenizer, prompts, max_new_tokens=8, verbose=False)
    qg.engine.close()
    assert result.generated_ids == [hf_greedy(qg.model, tokenizer, p, 8) for p in prompts]
    assert fake_qaic.PROGRAMS[0].kv_bytes_transferred == 0

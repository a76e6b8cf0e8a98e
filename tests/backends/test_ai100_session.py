"""The SDK runtime path (compile -> load -> generate), against a stand-in of the SDK (``fake_qaic``).

The real ``qaicrt`` cannot run here; the stand-in models the documented API closely enough to prove the session's own
logic: bindings found by name, KV buffers never transferred (the device starts from garbage and keeps its copy),
logits read back per specialization, and greedy tokens equal to HF transformers.
"""

from __future__ import annotations

import sys

import pytest

from qgraph.backends.ai100_session import QAICDecoderSession
from qgraph.errors import QGraphError
from tests.backends import fake_qaic
from tests.parity import LONG_PROMPT, MY_NAME, NEW_TOKENS, hf_greedy


@pytest.fixture
def fake_sdk(monkeypatch, tmp_path):
    """The stand-in SDK importable as ``qaicrt`` / ``QAicApi_pb2``; yields its compiler's path."""
    for name, module in fake_qaic.modules().items():
        monkeypatch.setitem(sys.modules, name, module)
    fake_qaic.PROGRAMS.clear()
    return fake_qaic.write_fake_compiler(tmp_path)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_generate_on_the_sdk_runtime_keeps_kv_on_the_device_and_matches_hf(fake_sdk, qeff_model, tokenizer, arch):
    qg = qeff_model(arch)
    qg.compile(backend="ai100", prefill_seq_len=8, ctx_len=64, batch_size=2, compiler=str(fake_sdk))
    prompts = [MY_NAME, LONG_PROMPT, "hello world"]  # two groups of two: the device buffers are reused, not cleared
    result = qg.generate(tokenizer, prompts, generation_len=NEW_TOKENS, verbose=False)
    assert result.generated_ids == [hf_greedy(qg.model, tokenizer, p) for p in prompts]
    (program,) = fake_qaic.PROGRAMS
    out = result.generated_ids
    chunks = [-(-max(result.prompt_lengths[:2]) // 8), -(-result.prompt_lengths[2] // 8)]
    assert program.runs == chunks[0] + max(map(len, out[:2])) - 1 + chunks[1] + len(out[2]) - 1
    assert program.kv_bytes_transferred == 0
    assert isinstance(qg._session, QAICDecoderSession) and qg._session.device_seconds > 0
    assert result.stats.device_s > 0


def test_the_session_refuses_a_batch_it_was_not_compiled_for(fake_sdk, qeff_model):
    qg = qeff_model("gpt2")
    qg.compile(backend="ai100", prefill_seq_len=8, ctx_len=64, batch_size=2, compiler=str(fake_sdk))
    session = qg.artifact.load()
    with pytest.raises(QGraphError, match="compiled for batch_size 2, not 3"):
        session.reset(3)


def test_several_cards_map_one_program(fake_sdk, qeff_model):
    qg = qeff_model("gpt2")
    qg.compile(
        backend="ai100",
        prefill_seq_len=8,
        ctx_len=64,
        batch_size=1,
        num_devices=2,
        device_ids=[2, 3],
        compiler=str(fake_sdk),
    )
    qg.artifact.load()
    (program,) = fake_qaic.PROGRAMS
    assert program.device is None and program.properties.devMapping == "2:3"


def test_device_ids_must_match_num_devices(fake_sdk, qeff_model):
    with pytest.raises(QGraphError, match="device_ids lists 2 card\\(s\\) but num_devices is 1"):
        qeff_model("gpt2").compile(backend="ai100", device_ids=[0, 1], compiler=str(fake_sdk))

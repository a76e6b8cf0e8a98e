"""Continuous batching: requests joining and leaving 4 KV slots give exactly the tokens they give alone."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from qgraph import QEFFAutoModelForCausalLM
from qgraph.errors import PromptTooLongError, QGraphError
from tests.parity import hf_greedy
from tests.tiny_models import WORDS

CHUNK = 8  # prefill_seq_len: prompts of 1 to 24 tokens take 1 to 3 chunks
SLOTS = 4
SMOLLM2 = Path("~/.cache/qgraph/weights/smollm2-135m-instruct-hf").expanduser()


def mixed_requests(n: int = 24) -> list[tuple[str, int]]:
    """(prompt, max_new_tokens): prompt lengths 1..24 words (1-3 prefill chunks), 1..23 new tokens, shuffled."""
    out = []
    for i in range(n):
        length = 1 + (i * 7) % 24
        words = [WORDS[(i * 5 + j * 3) % len(WORDS)] for j in range(length)]
        out.append((" ".join(words), 1 + (i * 11) % 23))
    return out


def submit_from_threads(submit, requests, threads: int = 3):
    """``submit(prompt, max_new_tokens)`` every request from ``threads`` threads, staggered; returns the handles in
    request order."""
    handles: list = [None] * len(requests)

    def worker(t):
        for i in range(t, len(requests), threads):
            time.sleep(0.003 * (i % 5))
            prompt, new_tokens = requests[i]
            handles[i] = submit(prompt, new_tokens)

    workers = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return handles


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def engine_model(request, tiny_model_dir, cache_dir):
    directory = tiny_model_dir(request.param)
    hf = AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager").eval()
    qg = QEFFAutoModelForCausalLM.from_pretrained(str(directory), cache_dir=cache_dir, verbose=False)
    qg.compile(prefill_seq_len=CHUNK, ctx_len=64, full_batch_size=SLOTS)
    yield hf, qg
    qg.engine.close()


def test_24_requests_from_threads_each_equal_hf_greedy_alone(engine_model, tokenizer):
    hf, qg = engine_model
    requests = mixed_requests()
    lengths = {len(tokenizer(p)["input_ids"]) for p, _ in requests}
    assert min(lengths) == 1 and max(lengths) > 2 * CHUNK, "prompts must take 1 to 3 prefill chunks"
    steps_before = qg.engine.decode_steps
    handles = submit_from_threads(lambda p, n: qg.submit(tokenizer, p, max_new_tokens=n), requests)
    results = [h.result(timeout=120) for h in handles]
    assert [r.generated_ids for r in results] == [hf_greedy(hf, tokenizer, p, n) for p, n in requests]
    # One at a time, each request takes one decode step per token after its first (which its prefill gives): fewer
    # steps in all means requests decoded together. (How many overlap depends on thread timing, so no fixed ratio.)
    alone = sum(len(r.generated_ids) - 1 for r in results)
    assert qg.engine.decode_steps - steps_before < alone, "decode steps must be shared"
    for r in results:
        assert r.finish_reason in ("eos", "length")
        assert 0 <= r.times.queue_s <= r.times.ttft_s <= r.times.e2e_s
        assert r.stats.generated_tokens == len(r.generated_ids)


def test_generate_on_a_full_batch_size_model_runs_through_the_engine(engine_model, tokenizer):
    hf, qg = engine_model
    prompts = [p for p, _ in mixed_requests(6)]
    steps_before = qg.engine.decode_steps
    result = qg.generate(tokenizer, prompts, max_new_tokens=10, verbose=False)
    assert result.generated_ids == [hf_greedy(hf, tokenizer, p, 10) for p in prompts]
    assert qg.engine.decode_steps > steps_before
    assert result.stats.batch_size == SLOTS and result.stats.generated_tokens == sum(map(len, result.generated_ids))


def test_a_cancelled_request_frees_its_slot_and_the_others_are_unaffected(engine_model, tokenizer, cache_dir):
    hf, qg = engine_model
    no_eos = dict(max_new_tokens=40, eos_token_id=[])  # all run their full length, so the timing below holds
    prompts = [p for p, _ in mixed_requests(5)]
    alone = [qg.generate(tokenizer, [p], verbose=False, **no_eos).generated_ids[0] for p in prompts]
    first = qg.submit(tokenizer, prompts[0], **no_eos)
    events = iter(first)
    next(events)  # running in a slot
    others = [qg.submit(tokenizer, p, **no_eos) for p in prompts[1:]]  # the last one waits for a free slot
    first.cancel()
    cancelled = first.result(timeout=60)
    assert cancelled.finish_reason == "cancelled"
    assert cancelled.generated_ids == alone[0][: len(cancelled.generated_ids)] and len(cancelled.generated_ids) < 40
    results = [h.result(timeout=60) for h in others]
    assert [r.generated_ids for r in results] == alone[1:]
    waiting = results[-1].times
    assert waiting.admitted < min(r.times.finished for r in results[:-1]), "the freed slot took the waiting request"
    assert list(events)[-1].finish_reason == "cancelled"


def test_handles_can_be_awaited_and_iterated(engine_model, tokenizer):
    hf, qg = engine_model
    prompts = [p for p, _ in mixed_requests(3)]

    async def main():
        return await asyncio.gather(*(qg.submit(tokenizer, p, max_new_tokens=6) for p in prompts))

    done = asyncio.run(main())
    assert [d.generated_ids for d in done] == [hf_greedy(hf, tokenizer, p, 6) for p in prompts]
    events = list(qg.submit(tokenizer, prompts[0], max_new_tokens=6))
    assert [t for e in events for t in e.token_ids] == done[0].generated_ids
    assert "".join(e.text for e in events) == done[0].text and events[-1].stats.ttft_s > 0
    streamed = list(qg.stream(tokenizer, prompts[0], max_new_tokens=6))
    assert "".join(e.text for e in streamed) == done[0].text


def test_a_prompt_that_cannot_fit_is_refused_at_submit(engine_model, tokenizer):
    _, qg = engine_model
    with pytest.raises(PromptTooLongError, match="ctx_len=64"):
        qg.submit(tokenizer, " ".join((WORDS * 2)[:70]))
    assert len(qg.submit(tokenizer, "hello world", max_new_tokens=3).result(timeout=60).generated_ids) <= 3


def test_full_batch_size_on_a_backend_without_continuous_batching_is_refused(tiny_model_dir, cache_dir, monkeypatch):
    from qgraph.backends.ort import OrtBackend

    caps = dataclasses.replace(OrtBackend.capabilities, continuous_batching=False)
    monkeypatch.setattr(OrtBackend, "capabilities", caps)
    qg = QEFFAutoModelForCausalLM.from_pretrained(str(tiny_model_dir("llama")), cache_dir=cache_dir, verbose=False)
    with pytest.raises(QGraphError, match="does not support continuous batching"):
        qg.compile(full_batch_size=4)


@pytest.mark.slow
@pytest.mark.skipif(not SMOLLM2.is_dir(), reason="SmolLM2 weights not converted here (bash scripts/demo.sh does it)")
def test_smollm2_24_requests_through_the_engine_equal_each_alone():
    tokenizer = AutoTokenizer.from_pretrained(SMOLLM2)
    static = QEFFAutoModelForCausalLM.from_pretrained(str(SMOLLM2), verbose=False)  # the demo's cached export
    static.compile(prefill_seq_len=CHUNK, ctx_len=64, batch_size=1)
    requests = [(p, min(n, 12)) for p, n in mixed_requests()]
    alone = [static.generate(tokenizer, [p], max_new_tokens=n, verbose=False).generated_ids[0] for p, n in requests]
    static.compile(prefill_seq_len=CHUNK, ctx_len=64, full_batch_size=SLOTS)
    handles = submit_from_threads(lambda p, n: static.submit(tokenizer, p, max_new_tokens=n), requests)
    assert [h.result(timeout=600).generated_ids for h in handles] == alone
    static.engine.close()

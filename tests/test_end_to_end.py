"""Greedy parity: qgraph through the ORT backend gives exactly HF transformers' tokens."""

from __future__ import annotations

import pytest
from transformers import AutoModelForCausalLM

from qgraph import QEFFAutoModelForCausalLM
from tests.parity import LONG_PROMPT, MY_NAME, NEW_TOKENS, hf_greedy

ARCHS = ["gpt2", "llama"]


@pytest.fixture(scope="module", params=ARCHS)
def arch_models(request, tiny_model_dir, cache_dir):
    directory = tiny_model_dir(request.param)
    hf = AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager").eval()
    qg = QEFFAutoModelForCausalLM.from_pretrained(str(directory), cache_dir=cache_dir, verbose=False)
    return hf, qg


def test_single_prompt_matches_hf_greedy(arch_models, tokenizer):
    hf, qg = arch_models
    qg.compile(prefill_seq_len=8, ctx_len=64, batch_size=1)
    result = qg.generate(tokenizer, [MY_NAME], generation_len=NEW_TOKENS, verbose=False)
    assert result.generated_ids == [hf_greedy(hf, tokenizer, MY_NAME)]


def test_batch_of_different_lengths_with_chunked_prefill_matches_hf_greedy(arch_models, tokenizer):
    hf, qg = arch_models
    prompts = [MY_NAME, LONG_PROMPT]
    assert len(tokenizer(LONG_PROMPT)["input_ids"]) > 8, "the long prompt must need two prefill chunks"
    qg.compile(prefill_seq_len=8, ctx_len=64, batch_size=2)
    result = qg.generate(tokenizer, prompts, generation_len=NEW_TOKENS, verbose=False)
    assert result.generated_ids == [hf_greedy(hf, tokenizer, p) for p in prompts]
    assert result.generated_texts == [tokenizer.decode(ids, skip_special_tokens=True) for ids in result.generated_ids]


def test_more_prompts_than_batch_size_run_in_groups(arch_models, tokenizer):
    hf, qg = arch_models
    prompts = [LONG_PROMPT, MY_NAME, "hello world"]
    qg.compile(prefill_seq_len=8, ctx_len=64, batch_size=2)
    result = qg.generate(tokenizer, prompts, generation_len=6, verbose=False)
    assert result.generated_ids == [hf_greedy(hf, tokenizer, p, 6) for p in prompts]


def test_stats_are_consistent_with_the_run(arch_models, tokenizer):
    _, qg = arch_models
    qg.compile(prefill_seq_len=8, ctx_len=64, batch_size=2)
    result = qg.generate(tokenizer, [MY_NAME, LONG_PROMPT], generation_len=10, verbose=False)
    stats = result.stats
    generated = sum(len(ids) for ids in result.generated_ids)
    assert stats.generated_tokens == generated
    assert stats.decode_tokens == generated - 2
    assert stats.prompt_tokens == sum(result.prompt_lengths)
    assert 0 < stats.ttft_s <= stats.e2e_s
    assert stats.prefill_s + stats.decode_s <= stats.e2e_s
    assert stats.decode_tok_s == pytest.approx(stats.decode_tokens / stats.decode_s)
    assert stats.total_tok_s == pytest.approx(generated / stats.e2e_s)
    assert 0 < stats.device_s <= stats.e2e_s


def test_streaming_prints_the_same_text_it_returns(arch_models, tokenizer, capsys):
    _, qg = arch_models
    qg.compile(prefill_seq_len=8, ctx_len=64, batch_size=1)
    result = qg.generate(tokenizer, MY_NAME, generation_len=8, stream=True, verbose=False)
    printed = capsys.readouterr().out
    assert printed.startswith(MY_NAME)
    assert result.generated_texts[0].strip() in printed


def test_generation_is_capped_by_ctx_len_with_a_note(arch_models, tokenizer):
    _, qg = arch_models
    qg.compile(prefill_seq_len=8, ctx_len=20, batch_size=1)
    result = qg.generate(tokenizer, [LONG_PROMPT], generation_len=50, verbose=False)
    room = 20 - len(tokenizer(LONG_PROMPT)["input_ids"]) + 1
    assert len(result.generated_ids[0]) <= room
    assert any(f"capped to {room}" in note for note in result.notes)

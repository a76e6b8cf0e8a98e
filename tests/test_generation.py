"""Decoding options through ``generate``: seeded sampling, greedy limits, HF names, unknown arguments refused."""

from __future__ import annotations

import json

import pytest
from transformers import AutoModelForCausalLM, GenerationConfig

from qgraph import QEFFAutoModelForCausalLM
from qgraph.decoding import generation_config_defaults, resolve_options
from qgraph.errors import QGraphError
from tests.parity import LONG_PROMPT, MY_NAME, hf_greedy

OTHER = "hello world the sun"


@pytest.fixture(scope="module")
def llama(tiny_model_dir, cache_dir):
    directory = tiny_model_dir("llama")
    hf = AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager").eval()
    qg = QEFFAutoModelForCausalLM.from_pretrained(str(directory), cache_dir=cache_dir, verbose=False)
    qg.compile(prefill_seq_len=8, ctx_len=64, batch_size=2)
    return hf, qg


def _ids(qg, tokenizer, prompts, **options):
    return qg.generate(tokenizer, prompts, verbose=False, **options).generated_ids


def test_seeded_sampling_repeats_and_ignores_the_rest_of_the_batch(llama, tokenizer):
    _, qg = llama
    sample = dict(do_sample=True, temperature=2.0, seed=7, max_new_tokens=16)
    alone = _ids(qg, tokenizer, [MY_NAME], **sample)[0]
    assert _ids(qg, tokenizer, [MY_NAME], **sample)[0] == alone
    assert _ids(qg, tokenizer, [MY_NAME, OTHER], **sample)[0] == alone
    assert _ids(qg, tokenizer, [OTHER, MY_NAME], **sample)[1] == alone
    assert _ids(qg, tokenizer, [LONG_PROMPT, OTHER, MY_NAME], **sample)[2] == alone  # second static group
    assert _ids(qg, tokenizer, [MY_NAME], **(sample | {"seed": 8}))[0] != alone
    assert alone != _ids(qg, tokenizer, [MY_NAME], max_new_tokens=16)[0], "temperature 2 should leave greedy"


@pytest.mark.parametrize("options", [dict(temperature=1e-4), dict(top_k=1, temperature=3.0)])
def test_tiny_temperature_or_top_k_1_equal_hf_greedy(llama, tokenizer, options):
    hf, qg = llama
    prompts = [MY_NAME, LONG_PROMPT]
    got = _ids(qg, tokenizer, prompts, do_sample=True, seed=1, max_new_tokens=24, **options)
    assert got == [hf_greedy(hf, tokenizer, p, 24) for p in prompts]


def test_repetition_penalty_greedy_equals_hf(llama, tokenizer):
    hf, qg = llama
    import torch

    enc = tokenizer(LONG_PROMPT, return_tensors="pt")
    with torch.no_grad():
        out = hf.generate(**enc, max_new_tokens=20, do_sample=False, repetition_penalty=1.5)
    expected = out[0, enc["input_ids"].shape[1] :].tolist()
    assert _ids(qg, tokenizer, [LONG_PROMPT], max_new_tokens=20, repetition_penalty=1.5)[0] == expected
    assert expected != hf_greedy(hf, tokenizer, LONG_PROMPT, 20), "the penalty should change this greedy run"


def test_max_new_tokens_is_generation_len(llama, tokenizer):
    _, qg = llama
    result = qg.generate(tokenizer, [MY_NAME], max_new_tokens=2, verbose=False)
    assert len(result.generated_ids[0]) == 2 and result.finish_reasons == ["length"]
    with pytest.raises(QGraphError, match="disagree"):
        qg.generate(tokenizer, [MY_NAME], generation_len=3, max_new_tokens=2, verbose=False)


def test_unknown_argument_is_an_error_naming_it_and_the_accepted_ones(llama, tokenizer):
    _, qg = llama
    with pytest.raises(QGraphError, match=r"unknown generate argument 'max_new_token'.*max_new_tokens"):
        qg.generate(tokenizer, [MY_NAME], max_new_token=2, verbose=False)


def test_qefficient_only_arguments_are_accepted_with_a_note(llama, tokenizer):
    _, qg = llama
    result = qg.generate(tokenizer, [MY_NAME], max_new_tokens=3, device_id=[0], verbose=False)
    assert len(result.generated_ids[0]) == 3
    assert any(note.startswith("device_id is ignored") for note in result.notes)


def test_eos_token_id_override_stops_there(llama, tokenizer):
    _, qg = llama
    free = _ids(qg, tokenizer, [MY_NAME], max_new_tokens=12)[0]
    stop_token = free[4]
    result = qg.generate(tokenizer, [MY_NAME], max_new_tokens=12, eos_token_id=stop_token, verbose=False)
    assert result.generated_ids[0] == free[: free.index(stop_token) + 1]
    assert result.finish_reasons == ["eos"]


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(do_sample=True, temperature=0), "temperature must be > 0"),
        (dict(top_p=1.5), "top_p must be > 0.0 and <= 1.0"),
        (dict(top_k="5"), "top_k must be an integer"),
        (dict(max_new_tokens=0), "max_new_tokens must be >= 1"),
        (dict(seed=-1), "seed must be >= 0"),
        (dict(stop=[""]), "stop must be a non-empty string"),
    ],
)
def test_bad_option_values_are_refused(options, message):
    with pytest.raises(QGraphError, match=message):
        resolve_options(options, {})


def test_generation_config_gives_defaults_that_arguments_override(tmp_path):
    GenerationConfig(do_sample=True, temperature=0.6, top_p=0.9, max_new_tokens=5, eos_token_id=[3, 9]).save_pretrained(
        tmp_path
    )
    defaults = generation_config_defaults(directory=tmp_path)
    assert defaults == {
        "do_sample": True,
        "temperature": 0.6,
        "top_p": 0.9,
        "max_new_tokens": 5,
        "eos_token_id": [3, 9],
    }
    assert json.loads((tmp_path / "generation_config.json").read_text())["temperature"] == 0.6
    options, _ = resolve_options({"temperature": 0.2}, defaults, tokenizer_eos=1)
    assert options.sampling.do_sample and options.sampling.temperature == 0.2 and options.sampling.top_p == 0.9
    assert options.sampling.top_k == 50  # transformers' global default when nothing sets it
    assert options.max_new_tokens == 5 and options.eos_token_ids == {3, 9}
    greedy, notes = resolve_options({"temperature": 0.2}, {}, tokenizer_eos=1)
    assert not greedy.sampling.do_sample and greedy.eos_token_ids == {1}
    assert any("do_sample is False" in n for n in notes)


def test_cli_decoding_flags_match_the_api(llama, tiny_model_dir, tokenizer, cache_dir, tmp_path, capsys):
    from qgraph.cli import main

    _, qg = llama
    tokenizer.save_pretrained(tmp_path / "tok")
    sample = dict(do_sample=True, temperature=2.0, seed=3, max_new_tokens=6)
    expected = qg.generate(tokenizer, [MY_NAME], verbose=False, **sample).generated_texts[0]
    capsys.readouterr()
    argv = ["infer", "--model", str(tiny_model_dir("llama")), "--tokenizer", str(tmp_path / "tok")]
    argv += ["--prompt", MY_NAME, "--prompt-len", "8", "--ctx-len", "64", "--batch-size", "2"]
    argv += ["--cache-dir", str(cache_dir), "--do-sample", "--temperature", "2", "--seed", "3", "--max-new-tokens", "6"]
    assert main(argv) == 0
    assert capsys.readouterr().out.startswith(f"{MY_NAME}{expected}\n")


def test_generate_from_four_threads_gives_each_call_its_own_result(llama, tokenizer):
    """4 threads x 10 calls with 1-3 prompts each on one compiled model (batch 2: some calls take two groups)."""
    from concurrent.futures import ThreadPoolExecutor

    _, qg = llama
    pool = [MY_NAME, LONG_PROMPT, OTHER, "one two three", "the cat and the dog"]
    calls = []
    for i in range(40):
        prompts = [pool[(i + j) % len(pool)] for j in range(1 + i % 3)]
        options = dict(max_new_tokens=4 + i % 7) | (dict(do_sample=True, seed=i) if i % 4 == 0 else {})
        calls.append((prompts, options))
    alone = [_ids(qg, tokenizer, prompts, **options) for prompts, options in calls]

    def thread(t):
        return [_ids(qg, tokenizer, calls[i][0], **calls[i][1]) for i in range(t, len(calls), 4)]

    with ThreadPoolExecutor(4) as executor:
        per_thread = list(executor.map(thread, range(4)))
    together = [per_thread[i % 4][i // 4] for i in range(len(calls))]
    assert together == alone

"""Speculative decoding gives exactly plain greedy's tokens (and HF transformers'), whatever the proposer guesses.

Each tiny architecture is compiled once with ``num_speculative_tokens=8``; ``k`` in {1, 3, 5, 8} runs over that one
compile. Batch 3 runs three prompts of different lengths (1 to 3 prefill chunks) in one static batch, so rows sit at
different positions in every verification run and accept different numbers of guesses; batch 1 runs them one by one.
Mistral's sliding window (12) is shorter than prompt + new tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoModelForCausalLM

from qgraph import QEFFAutoModelForCausalLM
from qgraph.decoding import GenerationOptions
from qgraph.errors import QGraphError
from qgraph.proposers import DraftModel, PromptLookup, Proposal, guesses_worth_checking, lookup
from qgraph.request import Request
from qgraph.run_costs import RunCosts
from qgraph.runtime import StepTimer
from qgraph.speculative import speculative_batch_steps
from tests.parity import LONG_PROMPT, hf_greedy
from tests.tiny_models import VOCAB_SIZE, make_tokenizer

ARCHS = ["gpt2", "llama", "qwen2", "mistral"]
K_MAX = 8
KS = [1, 3, 5, 8]
NEW = 24
CTX = 64
EOS = 3
# three lengths (2, 14 and 17 words: 1, 2 and 3 prefill chunks of 8); the second repeats itself for prompt lookup
PROMPTS = ["my name", "one two three four five six seven one two three four five six seven", LONG_PROMPT]


@dataclass
class Compiled:
    arch: str
    model: QEFFAutoModelForCausalLM
    plain: list[list[int]]  # plain greedy of PROMPTS through the same compile


@pytest.fixture(scope="module", params=ARCHS)
def compiled(request, tiny_model_dir, cache_dir, tokenizer) -> Compiled:
    arch = request.param
    qg = QEFFAutoModelForCausalLM.from_pretrained(str(tiny_model_dir(arch)), cache_dir=cache_dir, verbose=False)
    qg.compile(prefill_seq_len=8, ctx_len=CTX, batch_size=3, num_speculative_tokens=K_MAX)
    plain = qg.generate(tokenizer, PROMPTS, max_new_tokens=NEW, verbose=False).generated_ids
    return Compiled(arch, qg, plain)


@pytest.fixture(scope="module")
def int4_draft(compiled, tiny_model_dir, cache_dir):
    """The same tiny model compiled at int4 (weight-only), drafting for its float32 self."""
    draft = QEFFAutoModelForCausalLM.from_pretrained(
        str(tiny_model_dir(compiled.arch)), cache_dir=cache_dir, verbose=False
    )
    draft.compile(prefill_seq_len=8, ctx_len=CTX, precision="int4")
    return draft


class Oracle:
    """Guesses from a known continuation: right (the target's own greedy tokens) or always wrong (each one off)."""

    def __init__(self, continuations: list[list[int]], wrong: bool = False):
        self.continuations, self.wrong = continuations, wrong

    def reset(self, rows: int) -> None:
        pass

    def admit(self, row: int, request: Request) -> None:
        pass

    def propose(self, requests, limits) -> list[Proposal]:
        out = []
        for request, limit in zip(requests, limits, strict=True):
            if request is None:
                out.append(Proposal())
                continue
            done = len(request.generated)
            right = self.continuations[request.index][done : done + limit]
            out.append(Proposal([(t + 1) % VOCAB_SIZE for t in right] if self.wrong else right))
        return out

    def feedback(self, row: int, proposed: int, accepted: int) -> None:
        pass


def speculative(
    model, tokenizer, proposer, k: int, batch: int, prompts=PROMPTS, **options
) -> tuple[list[list[int]], StepTimer]:
    """Greedy generation through the speculative loop at static batch ``batch`` (the runtime, any proposer)."""
    options = GenerationOptions(
        max_new_tokens=options.pop("max_new_tokens", NEW), eos_token_ids=frozenset(options.pop("eos", {EOS}))
    )
    requests = [Request(tokenizer(p)["input_ids"], options, CTX, index=i) for i, p in enumerate(prompts)]
    timer = StepTimer()
    for _ in speculative_batch_steps(model._loaded_session(), requests, batch, 0, timer, proposer, k):
        pass
    return [r.generated for r in requests], timer


def test_the_speculative_compile_gives_hf_greedy(compiled, tiny_model_dir, tokenizer):
    hf = AutoModelForCausalLM.from_pretrained(tiny_model_dir(compiled.arch), attn_implementation="eager").eval()
    assert compiled.plain == [hf_greedy(hf, tokenizer, p, NEW) for p in PROMPTS]
    assert sum(map(len, compiled.plain)) > 2 * NEW, "the prompts should mostly run to their length"


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("k", KS)
def test_an_always_right_proposer_gives_plain_greedy_in_fewer_runs(compiled, tokenizer, k, batch):
    tokens, timer = speculative(compiled.model, tokenizer, Oracle(compiled.plain), k, batch)
    assert tokens == compiled.plain
    assert timer.accepted == timer.proposed > 0
    if k > 1:  # several tokens per run: fewer verification runs than tokens
        assert timer.verify_runs < sum(map(len, tokens)) - len(tokens)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("k", KS)
def test_an_always_wrong_proposer_gives_plain_greedy(compiled, tokenizer, k, batch):
    tokens, timer = speculative(compiled.model, tokenizer, Oracle(compiled.plain, wrong=True), k, batch)
    assert tokens == compiled.plain
    assert timer.proposed > 0 and timer.accepted == 0


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("k", KS)
def test_prompt_lookup_gives_plain_greedy(compiled, tokenizer, k, batch):
    tokens, timer = speculative(compiled.model, tokenizer, PromptLookup(k), k, batch)
    assert tokens == compiled.plain
    assert timer.proposed > 0


@pytest.mark.parametrize("k", KS)
def test_generate_with_prompt_lookup_num_tokens_gives_plain_greedy(compiled, tokenizer, k):
    result = compiled.model.generate(tokenizer, PROMPTS, max_new_tokens=NEW, verbose=False, prompt_lookup_num_tokens=k)
    assert result.generated_ids == compiled.plain
    assert result.stats.proposed_tokens >= result.stats.accepted_tokens
    assert result.stats.proposed_tokens > 0


@pytest.mark.parametrize("k", KS)
def test_int4_self_draft_gives_float32_greedy(compiled, int4_draft, tokenizer, k):
    result = compiled.model.generate(
        tokenizer, PROMPTS, max_new_tokens=NEW, verbose=False, assistant_model=int4_draft, num_assistant_tokens=k
    )
    assert result.generated_ids == compiled.plain
    assert result.stats.accepted_tokens > 0, "an int4 copy of the model should guess some tokens right"


def test_int4_self_draft_at_batch_1(compiled, int4_draft, tokenizer):
    tokens, timer = speculative(compiled.model, tokenizer, DraftModel(int4_draft, K_MAX), K_MAX, 1)
    assert tokens == compiled.plain
    assert timer.accepted > 0


def test_another_architecture_drafts_with_the_same_tokenizer(compiled, tiny_model_dir, cache_dir, tokenizer):
    other = "qwen2" if compiled.arch != "qwen2" else "llama"
    draft = QEFFAutoModelForCausalLM.from_pretrained(str(tiny_model_dir(other)), cache_dir=cache_dir, verbose=False)
    draft.compile(prefill_seq_len=4, ctx_len=32, batch_size=1)  # shorter buffers than the target's: drafts less
    result = compiled.model.generate(tokenizer, PROMPTS, max_new_tokens=NEW, verbose=False, assistant_model=draft)
    assert result.generated_ids == compiled.plain
    assert result.stats.proposed_tokens > 0


# -- stop conditions cut the accepted tokens where plain decoding stops -------------------------------------------


def test_stops_inside_an_accepted_run_are_where_plain_greedy_stops(compiled, tokenizer):
    row = max(range(len(PROMPTS)), key=lambda i: len(compiled.plain[i]))
    target = compiled.plain[row]
    eos = target[5]  # a token that is accepted in the middle of a run of 8 right guesses
    cut = target[: target.index(eos) + 1]
    options = dict(max_new_tokens=NEW, eos_token_id=eos)
    lookup_ids = compiled.model.generate(tokenizer, PROMPTS[row], verbose=False, prompt_lookup_num_tokens=8, **options)
    plain_ids = compiled.model.generate(tokenizer, PROMPTS[row], verbose=False, **options)
    assert lookup_ids.generated_ids == plain_ids.generated_ids == [cut]
    tokens, _ = speculative(compiled.model, tokenizer, Oracle(compiled.plain), K_MAX, 3, max_new_tokens=5)
    assert tokens == [t[:5] for t in compiled.plain]


def test_stop_strings_cut_like_plain_decoding(compiled, tokenizer):
    row = max(range(len(PROMPTS)), key=lambda i: len(compiled.plain[i]))
    text = tokenizer.decode(compiled.plain[row][4:6])
    plain = compiled.model.generate(tokenizer, PROMPTS[row], max_new_tokens=NEW, stop=[text], verbose=False)
    spec = compiled.model.generate(
        tokenizer, PROMPTS[row], max_new_tokens=NEW, stop=[text], verbose=False, prompt_lookup_num_tokens=8
    )
    assert (spec.generated_ids, spec.generated_texts, spec.finish_reasons) == (
        plain.generated_ids,
        plain.generated_texts,
        plain.finish_reasons,
    )


def test_the_end_of_ctx_len_is_where_plain_decoding_ends(compiled, tokenizer):
    long = " ".join([LONG_PROMPT] * 3)  # 51 tokens: 14 new tokens fit ctx_len 64
    plain = compiled.model.generate(tokenizer, long, verbose=False, eos_token_id=[])
    oracle = Oracle([plain.generated_ids[0]])
    tokens, timer = speculative(
        compiled.model, tokenizer, oracle, K_MAX, 1, prompts=[long], max_new_tokens=None, eos=()
    )
    assert plain.finish_reasons == ["length"]
    assert len(plain.generated_ids[0]) == CTX - len(tokenizer(long)["input_ids"]) + 1
    assert tokens == plain.generated_ids and timer.accepted > 0


# -- names, errors, stats -------------------------------------------------------------------------------------------


def test_asking_for_more_guesses_than_compiled_is_an_error_naming_the_compile(compiled, tokenizer):
    with pytest.raises(QGraphError, match=r"num_speculative_tokens >= 9.*num_speculative_tokens=8.*compile"):
        compiled.model.generate(tokenizer, PROMPTS, verbose=False, prompt_lookup_num_tokens=9)
    with pytest.raises(QGraphError, match="give one"):
        compiled.model.generate(tokenizer, PROMPTS, verbose=False, prompt_lookup_num_tokens=2, assistant_model=object())


def test_stats_report_proposed_and_accepted_tokens(compiled, tokenizer):
    oracle = Oracle(compiled.plain)
    _, timer = speculative(compiled.model, tokenizer, oracle, 4, 3)
    result = compiled.model.generate(tokenizer, PROMPTS, max_new_tokens=NEW, verbose=False, prompt_lookup_num_tokens=4)
    stats = result.stats
    assert stats.proposed_tokens >= stats.accepted_tokens and stats.verify_runs > 0
    assert stats.mean_accepted_length == pytest.approx(stats.accepted_tokens / stats.verified_rows)
    assert f"{stats.proposed_tokens} proposed, {stats.accepted_tokens} accepted" in stats.format()
    assert timer.accepted / timer.verified_rows > 1, "right guesses of 4 at a time: more than one accepted per run"
    plain = compiled.model.generate(tokenizer, PROMPTS[1], max_new_tokens=NEW, verbose=False)
    assert plain.stats.proposed_tokens == 0 and "Speculative" not in plain.stats.format()


def test_streaming_with_prompt_lookup_joins_to_the_completion(compiled, tokenizer):
    events = list(compiled.model.stream(tokenizer, PROMPTS[1], max_new_tokens=NEW, prompt_lookup_num_tokens=8))
    assert [t for e in events for t in e.token_ids] == compiled.plain[1]
    assert "".join(e.text for e in events) == tokenizer.decode(compiled.plain[1], skip_special_tokens=True)
    assert events[-1].finish_reason is not None


def test_a_model_compiled_without_speculation_refuses_it(tiny_model_dir, cache_dir, tokenizer):
    qg = QEFFAutoModelForCausalLM.from_pretrained(str(tiny_model_dir("llama")), cache_dir=cache_dir, verbose=False)
    qg.compile(prefill_seq_len=8, ctx_len=CTX)
    with pytest.raises(QGraphError, match=r"compiled without it.*num_speculative_tokens=3"):
        qg.generate(tokenizer, PROMPTS, verbose=False, prompt_lookup_num_tokens=3)


# -- the prompt-lookup proposer on its own ----------------------------------------------------------------------------


def test_lookup_proposes_what_followed_the_most_recent_match():
    assert lookup([1, 2, 3, 9, 1, 2, 3, 7, 5, 1, 2, 3], 2) == [7, 5]  # the later "1 2 3" wins
    assert lookup([4, 5, 6, 4, 5], 3) == [6, 4, 5]  # the continuation may run into the tail itself
    assert lookup([1, 2, 3, 4], 3) == []  # nothing recurs
    assert lookup([8, 1, 2, 9, 2], 4, max_ngram=3) == [9, 2]  # falls back to a shorter n-gram


def test_prompt_lookup_backs_off_after_misses():
    proposer = PromptLookup(4)
    proposer.reset(1)
    request = Request([1, 2, 3, 1, 2], GenerationOptions(max_new_tokens=8), CTX)
    request.take(3)
    proposed = [len(proposer.propose([request], [4])[0].tokens)]
    for _ in range(3):  # three misses: pauses of 2, 4, 8 steps without proposing
        proposer.feedback(0, 4, 0)
        proposed += [len(proposer.propose([request], [4])[0].tokens) for _ in range(2 ** (_ + 1) + 1)]
    assert proposed[0] > 0
    assert proposed[1:3] == [0, 0] and proposed[3] > 0
    assert proposed[4:8] == [0, 0, 0, 0] and proposed[8] > 0


def _linear(per_guess: float):
    return lambda n: 1.0 + per_guess * n


def test_the_cost_model_checks_more_guesses_the_likelier_they_are_right():
    counts = [guesses_worth_checking(rate, 8, _linear(0.04)) for rate in (0.0, 0.02, 0.1, 0.3, 0.5, 0.7, 0.9, 0.99)]
    assert counts == sorted(counts)  # never fewer guesses for a higher acceptance rate
    assert counts[:2] == [0, 0]  # guesses rarer than their cost: none, a plain step pays more
    assert counts[2] == 1 and counts[-1] == 8  # barely worth it: one; almost surely right: all of them
    assert guesses_worth_checking(0.5, 8, _linear(0.0)) == 8  # free guesses: as many as allowed
    assert guesses_worth_checking(0.9, 8, _linear(1.0)) == 0  # a guess costing a whole step never pays
    # the count it picks is the best of expected tokens / run cost, against a plain step (1 token for 1)
    for rate in (0.2, 0.45, 0.8):
        value = [1.0] + [sum(rate**j for j in range(n + 1)) / (1 + 0.04 * n) for n in range(1, 9)]
        assert guesses_worth_checking(rate, 8, _linear(0.04)) == int(np.argmax(value))


def test_run_costs_are_learned_from_run_times_with_a_prior_until_seen():
    costs = RunCosts(prior_per_guess=0.1)
    assert costs.relative(0) == 1.0 and costs.relative(3) == pytest.approx(1.3)  # nothing seen: the prior
    for _ in range(50):
        costs.observe(1, 0.020)
        costs.observe(4, 0.030)
    assert costs.relative(3) == pytest.approx(1.5)  # seen: 30 ms / 20 ms
    assert costs.relative(6) == pytest.approx(1.6)  # width 7 not seen yet: the prior
    costs.observe(2, 0.010)  # faster than one token (noise): never below a one-token run
    assert costs.relative(1) == 1.0


def _copying_request(length: int = 40) -> Request:
    """A context whose last 3 tokens recur with ``length`` tokens after them: a lookup can propose 8."""
    body = list(range(10, 10 + length))
    request = Request([*body, *body[:2]], GenerationOptions(max_new_tokens=8), CTX + 40)
    request.take(body[2])
    return request


def test_prompt_lookup_proposes_fewer_tokens_after_misses_and_more_after_matches():
    proposer = PromptLookup(8, costs=RunCosts(prior_per_guess=0.08))
    proposer.reset(1)
    request = _copying_request()

    def proposed() -> int:
        return len(proposer.propose([request], [8])[0].tokens)

    sizes = [proposed()]
    assert 1 < sizes[0] < 8  # no evidence yet (prior rate 0.5): a few guesses, not all 8
    for _ in range(5):  # every guess accepted: the proposals grow to all 8
        proposer.feedback(0, sizes[-1], sizes[-1])
        sizes.append(proposed())
    assert sizes == sorted(sizes) and sizes[-1] == 8
    size, silent, sizes = 8, [], []
    for _ in range(5):  # misses: longer and longer stretches without proposing, then fewer and fewer guesses
        proposer.feedback(0, size, 0)
        steps = 0
        while (size := proposed()) == 0:
            steps += 1
        silent.append(steps)
        sizes.append(size)
    assert silent == [2, 4, 8, 16, 16]  # paused 2 ** misses steps, at most 16
    assert sizes == sorted(sizes, reverse=True) and sizes[-1] < 8
    for _ in range(8):  # matches again: the proposals grow back
        proposer.feedback(0, size, size)
        size = proposed()
    assert size == 8


def test_prompt_lookup_acceptance_is_kept_by_match_length():
    """Guesses after a 1-token match that keep failing stop; those after a 3-token match are unaffected."""
    proposer = PromptLookup(8, max_pause=0, costs=RunCosts(prior_per_guess=0.08))
    proposer.reset(1)
    three_gram = _copying_request()
    one_gram = Request([5, 6, 7, 8, 9, 10, 11, 12, 13, 14], GenerationOptions(max_new_tokens=8), CTX)
    one_gram.take(5)  # only "5" recurs: a 1-token match, 9 tokens after it
    fresh = len(proposer.propose([three_gram], [8])[0].tokens)
    assert fresh == len(proposer.propose([one_gram], [8])[0].tokens)  # same prior for both lengths
    for _ in range(10):  # misses after 1-token matches, until such guesses are not worth a run any more
        guesses = proposer.propose([one_gram], [8])[0].tokens
        if not guesses:
            break
        proposer.feedback(0, len(guesses), 0)
    assert not guesses
    assert len(proposer.propose([three_gram], [8])[0].tokens) == fresh


def test_prompt_lookup_prices_guesses_by_the_runs_it_is_told_of():
    """Seen runs where each extra token costs as much as a step: no guess pays; nearly free: all do."""
    request = _copying_request()
    for per_token, expected in ((1.0, 0), (0.001, 8)):
        proposer = PromptLookup(8)
        proposer.reset(1)
        for width in range(1, 10):
            proposer.observe_run(width, 0.02 * (1 + per_token * (width - 1)))
        assert len(proposer.propose([request], [8])[0].tokens) == expected


def test_draft_probabilities_are_returned_when_sampling(compiled, int4_draft, tokenizer):
    draft = DraftModel(int4_draft, 3, confidence_threshold=0.0)  # every guess, however unsure
    draft.reset(1)
    options = GenerationOptions(max_new_tokens=8)
    sampling = GenerationOptions(
        sampling=type(options.sampling)(do_sample=True, temperature=1.5, seed=3), max_new_tokens=8
    )
    for opts, with_probs in ((options, False), (sampling, True)):
        request = Request(tokenizer(PROMPTS[1])["input_ids"], opts, CTX)
        request.take(5)
        draft.admit(0, request)
        [proposal] = draft.propose([request], [3])
        assert len(proposal.tokens) == 3
        assert (proposal.probs is not None) == with_probs
        if with_probs:
            assert proposal.probs.shape == (3, VOCAB_SIZE)
            np.testing.assert_allclose(proposal.probs.sum(axis=1), 1.0, rtol=1e-6)
            assert all(proposal.probs[j, t] > 0 for j, t in enumerate(proposal.tokens))


def test_the_draft_stops_after_a_guess_it_is_not_confident_of(compiled, int4_draft, tokenizer):
    """transformers' assistant_confidence_threshold: the guesses end with the first one whose draft probability is
    below the threshold (a tiny random model is never sure: threshold 1 keeps one guess, 0 keeps all)."""
    request = Request(tokenizer(PROMPTS[1])["input_ids"], GenerationOptions(max_new_tokens=8), CTX)
    request.take(5)
    proposals = {}
    for threshold in (0.0, 1.0):
        draft = DraftModel(int4_draft, 3, confidence_threshold=threshold)
        draft.reset(1)
        draft.admit(0, request)
        [proposals[threshold]] = draft.propose([request], [3])
    assert len(proposals[0.0].tokens) == 3
    assert proposals[1.0].tokens == proposals[0.0].tokens[:1]


def test_without_speculation_nothing_changes(compiled, tokenizer):
    again = compiled.model.generate(tokenizer, PROMPTS, max_new_tokens=NEW, verbose=False)
    assert again.generated_ids == compiled.plain and again.stats.verify_runs == 0


# -- continuous batching ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine_model(tiny_model_dir, cache_dir):
    qg = QEFFAutoModelForCausalLM.from_pretrained(str(tiny_model_dir("llama")), cache_dir=cache_dir, verbose=False)
    qg.compile(prefill_seq_len=8, ctx_len=CTX, full_batch_size=4, num_speculative_tokens=K_MAX)
    yield qg
    qg.engine.close()


def test_engine_requests_with_and_without_speculation_give_plain_greedy(
    engine_model, tiny_model_dir, cache_dir, tokenizer
):
    """Requests joining 4 slots, each with its own proposer (prompt lookup k=1..8, an int4 draft, none), accept
    different numbers of tokens per run and still give exactly the tokens they give alone without speculation."""
    draft = QEFFAutoModelForCausalLM.from_pretrained(str(tiny_model_dir("llama")), cache_dir=cache_dir, verbose=False)
    draft.compile(prefill_seq_len=8, ctx_len=CTX, precision="int4")
    prompts = [PROMPTS[i % 3] + " " + " ".join(PROMPTS[(i + 1) % 3].split()[: i % 4]) for i in range(9)]
    lookup, drafted, plain = (
        ({"prompt_lookup_num_tokens": 1 + (i * 3) % 8} for i in range(9)),
        {"assistant_model": draft},
        {},
    )
    choices = [next(lookup) if i % 3 == 0 else drafted if i % 3 == 1 else plain for i in range(9)]
    alone = [engine_model.generate(tokenizer, p, max_new_tokens=NEW, verbose=False).generated_ids[0] for p in prompts]
    handles = [
        engine_model.submit(tokenizer, p, max_new_tokens=NEW, **c) for p, c in zip(prompts, choices, strict=True)
    ]
    completions = [h.result(timeout=600) for h in handles]
    assert [c.generated_ids for c in completions] == alone
    assert sum(c.stats.proposed_tokens for c in completions) > 0
    assert sum(c.stats.accepted_tokens for c in completions) > 0
    events = list(engine_model.submit(tokenizer, prompts[1], max_new_tokens=NEW, prompt_lookup_num_tokens=8))
    assert [t for e in events for t in e.token_ids] == alone[1]


def test_engine_refuses_more_guesses_than_compiled(engine_model, tokenizer):
    with pytest.raises(QGraphError, match="num_speculative_tokens >= 9"):
        engine_model.submit(tokenizer, PROMPTS[0], prompt_lookup_num_tokens=9)


# -- sampling through the verification loop ---------------------------------------------------------------------------

MARKOV_VOCAB = 5
# logits of the next token given the last one (a "graph with known logits"); -inf: a token that never follows
MARKOV_PROBS = np.array(
    [
        [0.05, 0.4, 0.3, 0.25, 0.0],
        [0.3, 0.05, 0.0, 0.25, 0.4],
        [0.2, 0.2, 0.2, 0.2, 0.2],
        [0.0, 0.6, 0.1, 0.1, 0.2],
        [0.5, 0.0, 0.25, 0.0, 0.25],
    ]
)
MARKOV_LOGITS = np.where(MARKOV_PROBS > 0, np.log(np.maximum(MARKOV_PROBS, 1e-30)), -np.inf)


class KnownLogits:
    """A decoder session whose logits depend on each position's own token only: a Markov chain with known law."""

    ctx_len, prefill_seq_len, device_seconds, logits_positions = 32, 4, 0.0, None

    def reset(self, batch_size: int) -> None:
        pass

    def run(self, input_ids: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        return MARKOV_LOGITS[input_ids].astype(np.float32)


class MostLikelyChain:
    """A deterministic proposer: the most likely continuation of the chain (right often, not always)."""

    def reset(self, rows: int) -> None:
        pass

    def admit(self, row: int, request: Request) -> None:
        pass

    def propose(self, requests, limits) -> list[Proposal]:
        out = []
        for request, limit in zip(requests, limits, strict=True):
            chain = [request.context[-1]] if request is not None else []
            for _ in range(limit if request is not None else 0):
                chain.append(int(np.argmax(MARKOV_LOGITS[chain[-1]])))
            out.append(Proposal(chain[1:]))
        return out

    def feedback(self, row: int, proposed: int, accepted: int) -> None:
        pass


def test_speculative_sampling_through_the_loop_follows_plain_sampling():
    """The first pair and the (3rd, 4th) pair of tokens of seeded sampling requests decoded speculatively (k = 3,
    deterministic guesses checked by ``speculative_accept`` against each request's own distribution) are distributed
    as plain sampling's. Chi-square at a one-in-a-million false-failure rate per pair."""
    from qgraph.sampling import SamplingOptions
    from tests.test_sampling import Z_ONE_IN_A_MILLION, _chi_square_critical

    runs, start = 6000, 2
    requests = [
        Request([start], GenerationOptions(SamplingOptions(do_sample=True, seed=seed), max_new_tokens=5), 32)
        for seed in range(runs)
    ]
    timer = StepTimer()
    for _ in speculative_batch_steps(KnownLogits(), requests, 200, 0, timer, MostLikelyChain(), 3):
        pass
    assert 0 < timer.accepted < timer.proposed
    chain = MARKOV_PROBS
    for first in (0, 2):
        law = np.linalg.matrix_power(chain, first + 1)[start][:, None] * chain
        pairs = np.array([r.generated[first : first + 2] for r in requests])
        counts = np.bincount(pairs[:, 0] * MARKOV_VOCAB + pairs[:, 1], minlength=MARKOV_VOCAB**2)
        expected = law.ravel() * runs
        possible = expected > 0
        assert counts[~possible].sum() == 0, "a pair plain sampling never emits was emitted"
        chi2 = float((((counts[possible] - expected[possible]) ** 2) / expected[possible]).sum())
        assert chi2 < _chi_square_critical(int(possible.sum()) - 1, Z_ONE_IN_A_MILLION), (first, chi2)


def test_seeded_speculative_sampling_repeats_and_top_k_1_is_greedy(compiled, int4_draft, tokenizer):
    sample = dict(do_sample=True, temperature=1.5, seed=11, max_new_tokens=NEW, verbose=False)
    for speculation in ({"prompt_lookup_num_tokens": 4}, {"assistant_model": int4_draft}):
        once = compiled.model.generate(tokenizer, PROMPTS, **sample, **speculation).generated_ids
        assert compiled.model.generate(tokenizer, PROMPTS, **sample, **speculation).generated_ids == once
        greedy = compiled.model.generate(tokenizer, PROMPTS, **(sample | {"top_k": 1}), **speculation)
        assert greedy.generated_ids == compiled.plain  # a one-token distribution: sampling is greedy


# -- the CLI and the server take the same names -----------------------------------------------------------------------


def test_cli_prompt_lookup_and_assistant_model_print_plain_greedy(
    compiled, tiny_model_dir, cache_dir, tmp_path, capsys
):
    from qgraph.cli import main

    if compiled.arch != "llama":
        pytest.skip("one architecture is enough for the flags")
    tokenizer_dir = tmp_path / "tok"
    tokenizer = make_tokenizer(tokenizer_dir)
    expected = tokenizer.decode(compiled.plain[1], skip_special_tokens=True)
    model = str(tiny_model_dir("llama"))
    argv = ["infer", "--model", model, "--tokenizer", str(tokenizer_dir), "--prompt", PROMPTS[1]]
    argv += ["--prompt-len", "8", "--ctx-len", str(CTX), "--cache-dir", str(cache_dir), "--max-new-tokens", str(NEW)]
    for extra in (["--prompt-lookup-num-tokens", "4"], ["--assistant-model", model, "--assistant-precision", "int4"]):
        capsys.readouterr()
        assert main(argv + extra) == 0
        out = capsys.readouterr().out
        assert out.startswith(f"{PROMPTS[1]}{expected}\n") and "proposed" in out
    assert main(argv + ["--prompt-lookup-num-tokens", "4", "--num-speculative-tokens", "2"]) == 2
    assert "num_speculative_tokens >= 4" in capsys.readouterr().err


def test_server_takes_prompt_lookup_num_tokens_and_a_draft_model(engine_model, tiny_model_dir, cache_dir, tokenizer):
    """One server with a draft model (``--assistant-model``): a request asking for prompt lookup uses it, the others
    draft; both answer like plain greedy. Too many guesses is a 400 naming the compile."""
    openai = pytest.importorskip("openai")
    pytest.importorskip("uvicorn")
    from qgraph.server import Served, create_app
    from tests.test_server import _start

    directory = str(tiny_model_dir("llama"))
    model = QEFFAutoModelForCausalLM.from_pretrained(directory, cache_dir=cache_dir, verbose=False)
    model.compile(prefill_seq_len=8, ctx_len=CTX, full_batch_size=4, num_speculative_tokens=K_MAX)  # cached
    draft = QEFFAutoModelForCausalLM.from_pretrained(directory, cache_dir=cache_dir, verbose=False)
    draft.compile(prefill_seq_len=8, ctx_len=CTX, precision="int4")
    expected = engine_model.generate(tokenizer, PROMPTS[1], max_new_tokens=NEW, verbose=False).generated_texts[0]
    served = Served(model, tokenizer, assistant_model=draft)
    url, server, thread = _start(create_app(lambda: served, "tiny", max_queue=4))
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)
        for extra in ({"prompt_lookup_num_tokens": 8}, {}):
            response = client.completions.create(
                model="tiny", prompt=PROMPTS[1], max_tokens=NEW, temperature=0, extra_body=extra
            )
            assert response.choices[0].text == expected
        assert model.engine.speculation.proposed > 0
        with pytest.raises(openai.BadRequestError, match="num_speculative_tokens >= 9"):
            client.completions.create(
                model="tiny", prompt=PROMPTS[1], temperature=0, extra_body={"prompt_lookup_num_tokens": 9}
            )
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def test_ort_allow_spinning_is_a_session_option():
    """Sessions that take turns on the same cores (a draft and its target) may turn spinning off."""
    from qgraph.backends.ort_options import session_options

    assert session_options({"allow_spinning": False}).get_session_config_entry("session.intra_op.allow_spinning") == "0"
    with pytest.raises(QGraphError, match="allow_spinning.*true or false"):
        session_options({"allow_spinning": "no"})


# -- SmolLM2 (real weights, slow) -------------------------------------------------------------------------------

SMOLLM2 = Path("~/.cache/qgraph/weights/smollm2-135m-instruct-hf").expanduser()
CODE = "def area(width, height):\n    return width * height\n\n\nprint(area(3, 4))\nprint(area(5, 6))\n"


@pytest.mark.slow
@pytest.mark.skipif(not SMOLLM2.is_dir(), reason="SmolLM2 weights not converted here (bash scripts/demo.sh does it)")
def test_smollm2_prompt_lookup_and_int4_self_draft_give_float32_greedy():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(SMOLLM2)
    target = QEFFAutoModelForCausalLM.from_pretrained(str(SMOLLM2), verbose=False)
    target.compile(prefill_seq_len=32, ctx_len=256, batch_size=3, num_speculative_tokens=K_MAX)
    draft = QEFFAutoModelForCausalLM.from_pretrained(str(SMOLLM2), verbose=False)
    draft.compile(prefill_seq_len=32, ctx_len=256, precision="int4")
    conversations = [
        [{"role": "user", "content": f"Rename area to rectangle_area in this code:\n{CODE}"}],
        [{"role": "user", "content": "What is the capital of France?"}],
        [{"role": "user", "content": f"Repeat this code exactly:\n{CODE}"}],
    ]
    plain = target.generate(tokenizer, messages=conversations, max_new_tokens=32, verbose=False).generated_ids
    for k in (1, 3, 5, 8):
        for speculation in ({"prompt_lookup_num_tokens": k}, {"assistant_model": draft, "num_assistant_tokens": k}):
            result = target.generate(tokenizer, messages=conversations, max_new_tokens=32, verbose=False, **speculation)
            assert result.generated_ids == plain, (k, list(speculation))
            assert result.stats.accepted_tokens > 0
    alone = target.generate(tokenizer, messages=conversations[:1], max_new_tokens=32, verbose=False, **speculation)
    assert alone.generated_ids == plain[:1]


def test_guesses_the_target_cannot_embed_are_dropped(compiled, tokenizer):
    """A draft with a larger (padded) vocabulary may guess ids the target has no row for: the guesses end there."""

    class OutOfRange(Oracle):
        def propose(self, requests, limits):
            proposals = super().propose(requests, limits)
            for p in proposals:
                if len(p.tokens) > 1:
                    p.tokens[1] = VOCAB_SIZE + 7
            return proposals

    tokens, timer = speculative(compiled.model, tokenizer, OutOfRange(compiled.plain), K_MAX, 3)
    assert tokens == compiled.plain and timer.accepted > 0

"""Speculative sampling keeps the target's distribution: the tokens it emits are distributed as plain sampling's.

The target is a Markov chain over a small vocabulary (the next token's distribution depends on the last token only,
and some tokens have probability 0, as after top-k), so the exact distribution of every pair of consecutive tokens
of plain sampling is known in closed form. A speculative decode loop built on ``speculative_accept`` is run many
times from the same context and its pairs are compared with that law by a chi-square test.

The same chain as an ONNX graph (logits = a row of a known table, picked by the token fed) runs the whole
speculative path: qgraph's speculative loop, verification runs through ONNX Runtime, each request's warped
distributions, the acceptance rule, with prompt lookup and test proposers.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from qgraph.backends.ort import OrtDecoderSession
from qgraph.decoding import GenerationOptions
from qgraph.proposers import PromptLookup, Proposal
from qgraph.request import Request
from qgraph.runtime import StepTimer
from qgraph.sampling import SamplingOptions, sampling_probabilities
from qgraph.speculative import speculative_batch_steps
from qgraph.speculative_sampling import speculative_accept
from tests.test_sampling import Z_ONE_IN_A_MILLION, _chi_square_critical

VOCAB = 6
START = 0  # the last context token
NEW_TOKENS = 5
PAIRS = [(0, 1), (3, 4)]  # (first, second) token and a later token with its conditional: indices into the output


def _target_chain() -> np.ndarray:
    """Row a: the target's sampling distribution after token a; one zero per row (a filtered token)."""
    rng = np.random.default_rng(20231130)
    table = rng.gamma(1.5, size=(VOCAB, VOCAB)) + 0.3
    table[np.arange(VOCAB), (np.arange(VOCAB) + 2) % VOCAB] = 0.0
    return table / table.sum(axis=1, keepdims=True)


def _draft_chain() -> np.ndarray:
    """A different, full-support distribution for a stochastic draft."""
    rng = np.random.default_rng(7)
    table = rng.gamma(1.0, size=(VOCAB, VOCAB)) + 0.1
    return table / table.sum(axis=1, keepdims=True)


TARGET = _target_chain()
DRAFT = _draft_chain()
NEVER = (np.arange(VOCAB) + 2) % VOCAB  # the token the target never emits after each token


class DeterministicProposer:
    """A fixed rule (like prompt lookup or a greedy draft): after a, the target's most likely next token."""

    def propose(self, last: int, k: int, rng: np.random.Generator) -> tuple[list[int], np.ndarray | None]:
        tokens = []
        for _ in range(k):
            last = int(np.argmax(TARGET[last]))
            tokens.append(last)
        return tokens, None


class AlwaysWrongProposer:
    """Deterministic, and always a token the target gives probability 0: every proposal must be rejected."""

    def propose(self, last, k, rng):
        tokens = []
        for _ in range(k):
            last = int(NEVER[last])
            tokens.append(last)
        return tokens, None


class ChainDraft:
    """A stochastic draft model: draws each proposal from its own chain and hands over the rows it drew from."""

    def __init__(self, chain: np.ndarray):
        self.chain = chain

    def propose(self, last, k, rng):
        tokens, rows = [], []
        for _ in range(k):
            row = self.chain[last]
            last = int(rng.choice(VOCAB, p=row))
            tokens.append(last)
            rows.append(row)
        return tokens, np.array(rows).reshape(k, VOCAB)


def speculative_run(proposer, k: int, rng: np.random.Generator, stats: dict) -> list[int]:
    """One request's tokens from a speculative loop: propose k, verify (the target's rows after each proposal), keep."""
    sequence = [START]
    while len(sequence) <= NEW_TOKENS:
        tokens, draft_probs = proposer.propose(sequence[-1], k, rng)
        target_probs = TARGET[[sequence[-1], *tokens]]
        kept = speculative_accept(target_probs, tokens, draft_probs, rng)
        assert 1 <= len(kept) <= k + 1 and kept[:-1] == tokens[: len(kept) - 1]
        stats["proposed"] += k
        stats["accepted"] += len(kept) - 1
        sequence += kept
    return sequence[1 : NEW_TOKENS + 1]


def _pair_law(first: int) -> np.ndarray:
    """Plain sampling's probability of (token[first], token[first + 1]) over VOCAB x VOCAB."""
    marginal = np.linalg.matrix_power(TARGET, first + 1)[START]
    return marginal[:, None] * TARGET


def _assert_follows(pairs: np.ndarray, law: np.ndarray) -> None:
    """Chi-square goodness of fit of observed pairs against a known law; a pair of probability 0 must never occur."""
    counts = np.bincount(pairs[:, 0] * VOCAB + pairs[:, 1], minlength=VOCAB * VOCAB)
    expected = law.ravel() * len(pairs)
    possible = expected > 0
    assert counts[~possible].sum() == 0, "a pair plain sampling never emits was emitted"
    assert (expected[possible] >= 5).all()
    chi2 = float((((counts[possible] - expected[possible]) ** 2) / expected[possible]).sum())
    assert chi2 < _chi_square_critical(int(possible.sum()) - 1, Z_ONE_IN_A_MILLION), chi2


RUNS = 12_000


@pytest.mark.parametrize(
    "proposer, k",
    [
        (DeterministicProposer(), 3),
        (DeterministicProposer(), 1),
        (ChainDraft(DRAFT), 3),
        (ChainDraft(TARGET), 3),  # always right: the draft is the target itself
        (AlwaysWrongProposer(), 2),
    ],
    ids=["deterministic-k3", "deterministic-k1", "draft-k3", "always-right-k3", "always-wrong-k2"],
)
def test_speculative_tokens_follow_plain_sampling(proposer, k):
    """The first two tokens and a later pair (4th, 5th) are distributed as plain sampling's, over 12 000 runs.

    False-failure rate: each of the two chi-square tests exceeds its critical value with probability 1e-6 for a
    correct rule (2e-6 per case, 1e-5 for the five cases); the seed is fixed, so the run is deterministic.
    """
    rng = np.random.default_rng(k * 1000 + 17)
    stats = {"proposed": 0, "accepted": 0}
    tokens = np.array([speculative_run(proposer, k, rng, stats) for _ in range(RUNS)])
    for first, second in PAIRS:
        _assert_follows(tokens[:, [first, second]], _pair_law(first))
    rate = stats["accepted"] / stats["proposed"]
    if isinstance(proposer, AlwaysWrongProposer):
        assert rate == 0
    elif isinstance(proposer, ChainDraft) and proposer.chain is TARGET:
        assert rate == 1
    else:
        assert 0.05 < rate < 0.95  # the interesting case: both branches of the rule are exercised


def test_the_chi_square_check_rejects_a_rule_that_keeps_every_proposal():
    """The test has power: keeping all proposals of the deterministic proposer (no rejection) fails it."""
    rng = np.random.default_rng(5)
    runs = []
    for _ in range(RUNS // 4):
        sequence = [START]
        while len(sequence) <= NEW_TOKENS:
            tokens, _ = DeterministicProposer().propose(sequence[-1], 3, rng)
            sequence += tokens  # wrong: no acceptance test
        runs.append(sequence[1 : NEW_TOKENS + 1])
    with pytest.raises(AssertionError):
        _assert_follows(np.array(runs)[:, [0, 1]], _pair_law(0))


def test_no_draft_tokens_is_one_draw_from_the_target():
    rng = np.random.default_rng(3)
    draws = [speculative_accept(TARGET[[1]], [], None, rng) for _ in range(4000)]
    assert all(len(d) == 1 for d in draws)
    counts = np.bincount([d[0] for d in draws], minlength=VOCAB)
    assert counts[NEVER[1]] == 0
    expected = TARGET[1] * len(draws)
    kept = expected > 0
    chi2 = float((((counts[kept] - expected[kept]) ** 2) / expected[kept]).sum())
    assert chi2 < _chi_square_critical(int(kept.sum()) - 1, Z_ONE_IN_A_MILLION)


def test_one_hot_target_is_greedy_verification():
    """With greedy's distribution (one-hot at the argmax) the rule keeps exactly the proposals equal to the argmax and
    the extra token is the argmax: no randomness left."""
    greedy = np.eye(VOCAB)[[4, 2, 5, 1]]
    rng = np.random.default_rng(0)
    assert speculative_accept(greedy, [4, 2, 5], None, rng) == [4, 2, 5, 1]
    assert speculative_accept(greedy, [4, 3, 5], None, rng) == [4, 2]
    assert speculative_accept(greedy, [0, 2, 5], DRAFT[:3], rng) == [4]


def test_a_proposal_its_draft_gave_no_mass_is_verified_as_deterministic():
    """q(x) = 0 cannot come from a proper draft; the position is then treated as q one-hot, which is still exact."""
    draft = np.full((1, VOCAB), 1 / (VOCAB - 1))
    draft[0, 3] = 0.0
    target = TARGET[[0, 3]]
    rng = np.random.default_rng(11)
    firsts = np.array([speculative_accept(target, [3], draft, rng)[0] for _ in range(6000)])
    counts = np.bincount(firsts, minlength=VOCAB)
    expected = TARGET[0] * firsts.size
    kept = expected > 0
    assert counts[~kept].sum() == 0
    chi2 = float((((counts[kept] - expected[kept]) ** 2) / expected[kept]).sum())
    assert chi2 < _chi_square_critical(int(kept.sum()) - 1, Z_ONE_IN_A_MILLION)


def test_rejection_with_no_residual_mass_draws_from_the_target():
    """p <= q everywhere after rounding (p == q up to float error) leaves max(0, p - q) empty: draw from p."""
    p = np.array([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]])
    q = np.array([[0.5 + 1e-12, 0.5 + 1e-12, 0.0]])  # rounding left q a hair above p on its whole support

    class AlwaysRejects:  # the uniform draw that rejects token 0 (u * q(0) >= p(0)), then a draw for the residual
        def __init__(self):
            self.values = iter([0.9999999999999, 0.25])

        def random(self):
            return next(self.values)

    # 0.25 of p[0]'s CDF is token 0, which a residual (if any were left) could not hold: p was drawn from
    assert speculative_accept(p, [0], q, AlwaysRejects()) == [0]


@pytest.mark.parametrize(
    "target_shape, tokens, draft_shape, message",
    [
        ((3, VOCAB), [1], None, "target_probs must be"),
        ((2, VOCAB), [1], (1, VOCAB + 1), "draft_probs must be"),
        ((2, VOCAB), [VOCAB], None, "outside the vocabulary"),
    ],
)
def test_shapes_that_do_not_match_are_refused(target_shape, tokens, draft_shape, message):
    draft = None if draft_shape is None else np.full(draft_shape, 1 / draft_shape[1])
    with pytest.raises(ValueError, match=message):
        speculative_accept(np.full(target_shape, 1 / VOCAB), tokens, draft, np.random.default_rng(0))


# -- through the runtime: a verification graph with known logits ---------------------------------------------------

CHAIN_LOGITS = np.log(_target_chain() + 0.02).astype(np.float32)  # row a: the logits after token a (all distinct)
CHAIN_OPTIONS = SamplingOptions(do_sample=True, temperature=0.9, top_k=VOCAB - 1)  # top-k drops one token per row
CHAIN_NEW_TOKENS = 3000


def _chain_session(tmp_path, ctx_len: int) -> OrtDecoderSession:
    """A retained-state graph whose logits at every position are CHAIN_LOGITS[the token fed there]: a first-order
    Markov chain with known transition probabilities, and logits for every fed token (a verification run's layout)."""
    state = [f"past_{kind}.0" for kind in ("key", "value")]
    nodes = [
        helper.make_node("Gather", ["table", "input_ids"], ["logits"], axis=0),
        *(helper.make_node("Identity", [s], [f"{s}_RetainedState"]) for s in state),
    ]
    table = helper.make_tensor("table", TensorProto.FLOAT, [VOCAB, VOCAB], CHAIN_LOGITS.ravel().tolist())
    kv = ["batch", 1, ctx_len, 1]
    graph = helper.make_graph(
        nodes,
        "chain_logits",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
            helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "seq"]),
            *(helper.make_tensor_value_info(s, TensorProto.FLOAT, kv) for s in state),
        ],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", VOCAB]),
            *(helper.make_tensor_value_info(f"{s}_RetainedState", TensorProto.FLOAT, kv) for s in state),
        ],
        [table],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    onnx.checker.check_model(model)
    path = tmp_path / "chain_logits.onnx"
    onnx.save(model, path)
    return OrtDecoderSession(path, {}, ["CPUExecutionProvider"], prefill_seq_len=4)


def _warped(last: int) -> np.ndarray:
    """The request's own sampling distribution after token ``last`` (what plain sampling draws from)."""
    return sampling_probabilities(CHAIN_LOGITS[last], CHAIN_OPTIONS)


class ChainProposer:
    """A test proposer on the runtime's interface: guesses from a chain of its own (sampled, with its rows), from the
    target's own distributions (always right), or the token top-k removes (always wrong)."""

    def __init__(self, kind: str, seed: int = 0):
        self.kind = kind
        self.rng = np.random.default_rng(seed)

    def reset(self, rows: int) -> None:
        pass

    def admit(self, row, request) -> None:
        pass

    def feedback(self, row, proposed, accepted) -> None:
        pass

    def propose(self, requests, limits):
        proposals = []
        for request, limit in zip(requests, limits, strict=True):
            tokens, rows, last = [], [], None if request is None else request.context[-1]
            for _ in range(limit if request is not None else 0):
                if self.kind == "always-wrong":
                    last = int(np.argmin(CHAIN_LOGITS[last]))
                    tokens.append(last)
                    continue
                row = DRAFT[last] if self.kind == "draft" else _warped(last)
                last = int(self.rng.choice(VOCAB, p=row))
                tokens.append(last)
                rows.append(row)
            proposals.append(Proposal(tokens, np.array(rows).reshape(len(rows), VOCAB) if rows else None))
        return proposals


@pytest.mark.parametrize("proposer", ["prompt-lookup", "draft", "always-right", "always-wrong"])
def test_speculative_sampling_through_the_runtime_follows_the_chain(tmp_path, proposer):
    """4 requests x 3000 tokens through the speculative loop (k = 3, batch 4) on a graph with known logits: the
    count of every transition a -> b is chi-square consistent with n_a * P(b | a) of plain sampling (temperature 0.9,
    top-k 5 of 6), every position of a verification run included (accepted guesses, corrections, bonus tokens).

    False-failure rate: 1e-6 per case (Pearson's statistic of a Markov chain's transition counts, Anderson & Goodman
    1957, compared with the chi-square quantile); seeds are fixed, so the run is deterministic.
    """
    k = 3
    session = _chain_session(tmp_path, CHAIN_NEW_TOKENS + 8 + k + 1)
    requests = [
        Request(
            [0, 1, 2, s],
            GenerationOptions(SamplingOptions(**{**CHAIN_OPTIONS.__dict__, "seed": s}), CHAIN_NEW_TOKENS),
            session.ctx_len,
            index=s,
        )
        for s in range(4)
    ]
    chooser = PromptLookup(k) if proposer == "prompt-lookup" else ChainProposer(proposer, seed=7)
    timer = StepTimer()
    for _ in speculative_batch_steps(session, requests, 4, 0, timer, chooser, k):
        pass
    assert all(len(r.generated) == CHAIN_NEW_TOKENS for r in requests)
    counts = np.zeros((VOCAB, VOCAB), dtype=np.int64)
    for r in requests:
        sequence = np.array(r.context[3:])
        np.add.at(counts, (sequence[:-1], sequence[1:]), 1)
    expected = counts.sum(axis=1, keepdims=True) * np.stack([_warped(a) for a in range(VOCAB)])
    possible = expected > 0
    assert counts[~possible].sum() == 0, "a token top-k removes was emitted"
    assert (expected[possible] >= 5).all()
    chi2 = float((((counts[possible] - expected[possible]) ** 2) / expected[possible]).sum())
    dof = int(possible.sum()) - VOCAB
    assert chi2 < _chi_square_critical(dof, Z_ONE_IN_A_MILLION), chi2
    if proposer == "always-wrong":
        assert timer.proposed > 1000 and timer.accepted == 0
    elif proposer == "always-right":
        assert timer.accepted == timer.proposed > 1000
    else:
        assert 0.05 * timer.proposed < timer.accepted < 0.95 * timer.proposed

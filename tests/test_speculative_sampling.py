"""Speculative sampling keeps the target's distribution: the tokens it emits are distributed as plain sampling's.

The target is a Markov chain over a small vocabulary (the next token's distribution depends on the last token only,
and some tokens have probability 0, as after top-k), so the exact distribution of every pair of consecutive tokens
of plain sampling is known in closed form. A speculative decode loop built on ``speculative_accept`` is run many
times from the same context and its pairs are compared with that law by a chi-square test.
"""

from __future__ import annotations

import numpy as np
import pytest

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

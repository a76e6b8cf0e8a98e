"""Which proposed tokens a sampling request keeps: the speculative sampling acceptance rule.

Speculative decoding verifies k proposed tokens in one pass of the target model. For the output to follow the
target's own sampling distribution exactly (not just approximately), each proposal is kept or replaced by the rule of
Leviathan et al. 2023 ("Fast Inference from Transformers via Speculative Decoding", Algorithm 1) and Chen et al. 2023
("Accelerating Large Language Model Decoding with Speculative Sampling", Algorithm 2):

- draft token x_i is accepted with probability min(1, p_i(x_i) / q_i(x_i));
- at the first rejection the token is drawn from normalize(max(0, p_i - q_i)) and the rest is discarded;
- when all k are accepted, a bonus token is drawn from p_{k+1}.

A deterministic proposer (prompt lookup, a greedy draft) is the case q_i = one-hot(x_i): x_i is kept with
probability p_i(x_i) and otherwise replaced by a draw from p_i with x_i removed. With a one-hot p (greedy target) the
rule keeps exactly the proposals that equal the argmax, and the replacement is the argmax: greedy decoding falls out.

Every draw is one uniform number through the inverse CDF, from the request's own generator, as in
``qgraph.sampling``: a request's tokens depend only on its seed and its proposals.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["speculative_accept"]


def speculative_accept(
    target_probs: np.ndarray,
    draft_tokens: Sequence[int],
    draft_probs: np.ndarray | None,
    rng: np.random.Generator,
) -> list[int]:
    """The tokens one request keeps from one verification pass: the accepted prefix of ``draft_tokens`` and one more
    token (the correction at the first rejection, or the bonus token after k acceptances), 1 to k + 1 tokens.

    ``target_probs`` is [k + 1, V]: row i is the request's own warped sampling distribution for the token after the
    context plus ``draft_tokens[:i]``. ``draft_probs`` is [k, V], the distributions the proposals were drawn from, or
    None for a deterministic proposer (each q_i one-hot at its token).
    """
    k = len(draft_tokens)
    target = np.asarray(target_probs, dtype=np.float64)
    if target.ndim != 2 or target.shape[0] != k + 1:
        raise ValueError(f"target_probs must be [k + 1, V] = [{k + 1}, V] for {k} draft tokens, got {target.shape}")
    vocab = target.shape[1]
    draft = None
    if draft_probs is not None:
        draft = np.asarray(draft_probs, dtype=np.float64)
        if draft.shape != (k, vocab):
            raise ValueError(f"draft_probs must be [k, V] = [{k}, {vocab}], got {draft.shape}")
    kept: list[int] = []
    for i, token in enumerate(draft_tokens):
        token = int(token)
        if not 0 <= token < vocab:
            raise ValueError(f"draft token {token} at position {i} is outside the vocabulary of {vocab}")
        p = target[i]
        q_token = 1.0 if draft is None else draft[i, token]
        if q_token <= 0:
            # A proposal its own distribution gives no mass cannot have been drawn from it; treating the position as
            # a deterministic proposal (q one-hot) keeps the output exact whatever chose the token.
            q = None
            q_token = 1.0
        else:
            q = None if draft is None else draft[i]
        if rng.random() * q_token < p[token]:  # u < p(x) / q(x), without dividing
            kept.append(token)
            continue
        kept.append(_draw(_residual(p, q, token), rng))
        return kept
    kept.append(_draw(target[k], rng))
    return kept


def _residual(p: np.ndarray, q: np.ndarray | None, token: int) -> np.ndarray:
    """max(0, p - q), or p itself where rounding left no mass (p and q equal up to float error: the rejection was a
    round-off event and p is the distribution it should have drawn from)."""
    if q is None:
        residual = p.copy()
        residual[token] = 0.0
    else:
        residual = np.maximum(p - q, 0.0)
    return residual if residual.sum() > 0 else p


def _draw(weights: np.ndarray, rng: np.random.Generator) -> int:
    """One token from unnormalised non-negative weights by the inverse CDF (one uniform draw)."""
    cumulative = np.cumsum(weights)
    index = int(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right"))
    index = min(index, weights.size - 1)
    while weights[index] == 0:  # round-off at the top of the CDF: step back to a token with mass
        index -= 1
    return index

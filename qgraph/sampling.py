"""Choosing the next token from logits, with HF transformers' names and semantics.

The order and the arithmetic follow transformers' ``generate``: the repetition penalty (a logits processor, applied in
greedy and sampling alike) first, then, when sampling, temperature, top-k, top-p and min-p (the warpers), then a draw
from the softmax of what is left. Each request draws from its own seeded ``numpy.random.Generator``, so its tokens
depend only on its own seed, never on the other rows of a batch.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SamplingOptions:
    """How one request picks tokens; ``do_sample=False`` is greedy (argmax after the repetition penalty)."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None  # None or 0: no top-k filtering
    top_p: float = 1.0
    min_p: float | None = None
    repetition_penalty: float = 1.0
    seed: int | None = None


def apply_repetition_penalty(logits: np.ndarray, previous_ids: Iterable[int], penalty: float) -> np.ndarray:
    """transformers' ``RepetitionPenaltyLogitsProcessor``: every token already in the sequence (prompt included) has
    its logit divided by ``penalty`` when positive and multiplied by it when negative."""
    if penalty == 1.0:
        return logits
    seen = np.unique(np.fromiter(previous_ids, dtype=np.int64))
    if seen.size == 0:
        return logits
    out = logits.astype(np.float32, copy=True)
    values = out[seen]
    out[seen] = np.where(values < 0, values * penalty, values / penalty)
    return out


def filtered_logits(
    logits: np.ndarray,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float = 1.0,
    min_p: float | None = None,
) -> np.ndarray:
    """The sampling warpers in transformers' order; removed tokens become ``-inf``."""
    scores = logits.astype(np.float32, copy=True)
    if temperature != 1.0:
        scores = scores / np.float32(temperature)
    if top_k:
        k = min(top_k, scores.size)
        kth = np.partition(scores, -k)[-k]
        scores[scores < kth] = -np.inf
    if top_p < 1.0:
        order = np.argsort(scores, kind="stable")  # ascending, as transformers sorts
        cumulative = np.cumsum(_softmax(scores[order]))
        remove = cumulative <= (1 - top_p)
        remove[-1] = False  # keep at least one token
        scores[order[remove]] = -np.inf
    if min_p is not None:
        probs = _softmax(scores)
        remove = probs < min_p * probs.max()
        remove[np.argmax(probs)] = False
        scores[remove] = -np.inf
    return scores


def sampling_probabilities(logits: np.ndarray, options: SamplingOptions) -> np.ndarray:
    """The distribution a sampling request draws from for these (already penalised) logits."""
    return _softmax(filtered_logits(logits, options.temperature, options.top_k, options.top_p, options.min_p))


def _softmax(scores: np.ndarray) -> np.ndarray:
    shifted = np.exp(scores.astype(np.float64) - np.max(scores))
    return shifted / shifted.sum()


class TokenChooser:
    """One request's token choice: its options and its own random generator (seeded once, at creation)."""

    def __init__(self, options: SamplingOptions):
        self.options = options
        self.rng = np.random.default_rng(options.seed) if options.do_sample else None
        # greedy without a repetition penalty: the token is the logits' argmax, whatever came before
        self.argmax_only = not options.do_sample and options.repetition_penalty == 1.0

    def distribution(self, logits: np.ndarray, previous_ids: Iterable[int]) -> np.ndarray:
        """The distribution a sampling request draws its next token from (speculative sampling verifies against it)."""
        scores = apply_repetition_penalty(logits, previous_ids, self.options.repetition_penalty)
        return sampling_probabilities(scores, self.options)

    def __call__(self, logits: np.ndarray, previous_ids: Iterable[int]) -> int:
        scores = apply_repetition_penalty(logits, previous_ids, self.options.repetition_penalty)
        if self.rng is None:
            return int(scores.argmax())  # the method: np.argmax's dispatch wrapper costs a step microseconds
        probs = sampling_probabilities(scores, self.options)
        # inverse CDF: one uniform draw per token, so a request's stream of draws is fixed by its seed alone
        index = int(np.searchsorted(np.cumsum(probs), self.rng.random() * probs.sum(), side="right"))
        index = min(index, probs.size - 1)
        while probs[index] == 0:  # float round-off at the top of the CDF: step back to a kept token
            index -= 1
        return index

"""Strided perplexity: which tokens each window of a long text scores, and the scores of one window's logits.

A text longer than the context is cut into windows of ``ctx_len`` tokens starting every ``stride`` tokens (the
method of HF transformers' "Perplexity of fixed-length models" guide). Each window is run from an empty KV cache and
scores only its *new* tokens, those after the previous window's end, so every token is scored once, with at least
``ctx_len - stride`` tokens of context (all tokens before it when it falls in the first window). The count of scored
tokens is exact: a token is scored when the window holds a token before it, so with ``stride == ctx_len`` the first
token of each window is not scored (HF's guide subtracts one token per window in every case, a slight undercount
when windows overlap). Perplexity is ``exp(mean negative log-likelihood)`` over all scored tokens.

Pure numpy, no model: the same functions score qgraph's sessions, HF transformers' and onnxruntime-genai's logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qgraph.errors import QGraphError
from qgraph.validation import check_int

# Windows of 512 tokens every 256: each scored token sees 256-511 tokens of context (all before it in the first window).
DEFAULT_CTX_LEN = 512
DEFAULT_STRIDE = 256


@dataclass(frozen=True)
class Window:
    """Tokens ``[begin, end)`` of the text run together; the targets ``[first_target, end)`` are scored."""

    begin: int
    end: int
    first_target: int

    @property
    def scored(self) -> int:
        return self.end - self.first_target

    def rows(self) -> slice:
        """The rows of the window's logits ``[end - begin, V]`` that predict the scored targets."""
        return slice(self.first_target - 1 - self.begin, self.end - 1 - self.begin)


def check_windows(ctx_len: int, stride: int) -> None:
    """``ctx_len`` >= 2 (a window needs a token to predict from) and 1 <= ``stride`` <= ``ctx_len``."""
    check_int("ctx_len", ctx_len, 2)
    check_int("stride", stride, 1)
    if stride > ctx_len:
        raise QGraphError(
            f"stride {stride} is larger than ctx_len {ctx_len}: tokens between windows would never be scored; "
            f"give a stride <= ctx_len (e.g. {ctx_len // 2})"
        )


def strided_windows(n_tokens: int, ctx_len: int, stride: int) -> list[Window]:
    """Windows of ``ctx_len`` tokens every ``stride`` tokens until one reaches the end of the text."""
    check_windows(ctx_len, stride)
    if n_tokens < 2:
        raise QGraphError(f"the text has {n_tokens} token(s); perplexity needs at least 2: give a longer text")
    windows, previous_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + ctx_len, n_tokens)
        windows.append(Window(begin, end, max(previous_end, begin + 1)))
        previous_end = end
        if end == n_tokens:
            break
    return windows


@dataclass
class TokenScores:
    """Per scored token, in text order: negative log-likelihood (nats) and the model's top-1 prediction."""

    nll: np.ndarray  # float64 [n_scored]
    top1: np.ndarray  # int64 [n_scored]

    @property
    def perplexity(self) -> float:
        return float(np.exp(self.nll.mean()))

    @property
    def count(self) -> int:
        return int(self.nll.size)

    def agreement(self, other: TokenScores) -> float:
        """Fraction of scored tokens where both models' top-1 predictions are the same token."""
        if other.top1.shape != self.top1.shape:
            raise QGraphError(
                f"top-1 predictions of {self.top1.size} and {other.top1.size} tokens cannot be compared: "
                "score the same text with the same windows"
            )
        return float(np.mean(self.top1 == other.top1))

    @classmethod
    def concatenate(cls, parts: list[TokenScores]) -> TokenScores:
        return cls(np.concatenate([p.nll for p in parts]), np.concatenate([p.top1 for p in parts]))


def score_window(logits: np.ndarray, token_ids: np.ndarray, window: Window) -> TokenScores:
    """Scores of ``window``'s targets from its logits ``[end - begin, V]`` (any float dtype; log-softmax in float32,
    sums in float64)."""
    expected = window.end - window.begin
    if logits.ndim != 2 or logits.shape[0] != expected:
        raise QGraphError(
            f"logits of shape {tuple(logits.shape)} for a window of {expected} tokens: scoring needs one logits row "
            "per position (a graph compiled with last-token logits returns one row only)"
        )
    rows = np.asarray(logits[window.rows()], dtype=np.float32)
    targets = np.asarray(token_ids[window.first_target : window.end], dtype=np.int64)
    peak = rows.max(axis=-1, keepdims=True)
    log_sum = np.log(np.exp(rows - peak).sum(axis=-1, dtype=np.float64)) + peak[:, 0]
    target_logits = np.take_along_axis(rows, targets[:, None], axis=-1)[:, 0]
    return TokenScores(log_sum - target_logits.astype(np.float64), rows.argmax(axis=-1).astype(np.int64))

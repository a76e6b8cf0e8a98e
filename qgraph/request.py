"""One generation request: its prompt, options, token choice, text, stop condition and timings.

Both the static-batch runtime and the continuous-batching engine drive requests through ``accept`` (one row of
logits in, one token out), so a request gives the same tokens whichever path runs it and whatever shares its batch.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from qgraph.decoding import GenerationOptions
from qgraph.errors import PromptTooLongError, QGraphError
from qgraph.sampling import TokenChooser
from qgraph.stopping import TextTracker

FINISH_EOS, FINISH_STOP, FINISH_LENGTH, FINISH_CANCELLED = "eos", "stop", "length", "cancelled"


def room_for_new_tokens(prompt_len: int, ctx_len: int) -> int:
    """Tokens that fit: the first comes from prefill, each later one is fed back at the next position."""
    return ctx_len - prompt_len + 1


def check_prompt_fits(length: int, ctx_len: int, index: int = 0) -> None:
    if length == 0:
        raise QGraphError(f"prompt {index} is empty after tokenisation; give at least one token")
    if length >= ctx_len:
        raise PromptTooLongError(
            f"prompt {index} has {length} tokens but the model was compiled with ctx_len={ctx_len}, which must "
            f"hold the prompt and the generated tokens; compile with ctx_len > {length} or shorten the prompt"
        )


@dataclass
class RequestTimes:
    """``time.perf_counter`` stamps of one request's life; durations derived from them."""

    submitted: float
    admitted: float | None = None  # given a KV slot (its prefill starts)
    first_token: float | None = None
    finished: float | None = None
    prompt_tokens: int = 0
    generated_tokens: int = 0

    @property
    def queue_s(self) -> float:
        return (self.admitted or self.submitted) - self.submitted

    @property
    def ttft_s(self) -> float:
        return (self.first_token or self.submitted) - self.submitted

    @property
    def e2e_s(self) -> float:
        return (self.finished or self.submitted) - self.submitted

    @property
    def decode_tok_s(self) -> float:
        """Tokens after the first per second of this request's decode."""
        span = (self.finished or 0.0) - (self.first_token or 0.0)
        return (self.generated_tokens - 1) / span if self.generated_tokens > 1 and span > 0 else 0.0

    def as_dict(self) -> dict[str, float]:
        return {
            "queue_s": self.queue_s,
            "ttft_s": self.ttft_s,
            "e2e_s": self.e2e_s,
            "decode_tok_s": self.decode_tok_s,
            "prompt_tokens": self.prompt_tokens,
            "generated_tokens": self.generated_tokens,
        }


@dataclass
class SpeculationCounts:
    """Speculative decoding of one request: guesses checked, guesses accepted, verifications that checked any."""

    proposed: int = 0
    accepted: int = 0
    verified_rows: int = 0


class Request:
    """A prompt on its way to a completion. ``limit`` caps its new tokens by ``max_new_tokens`` and ``ctx_len``."""

    def __init__(
        self,
        prompt_ids: Sequence[int],
        options: GenerationOptions,
        ctx_len: int,
        tokenizer=None,
        index: int = 0,
        submitted: float | None = None,
    ):
        self.prompt_ids = [int(t) for t in prompt_ids]
        check_prompt_fits(len(self.prompt_ids), ctx_len, index)
        if options.stop and tokenizer is None:
            raise QGraphError("stop strings need the tokenizer to read the generated text; pass tokenizer=")
        self.options = options
        self.index = index
        room = room_for_new_tokens(len(self.prompt_ids), ctx_len)
        self.limit = min(options.max_new_tokens or room, room)
        self.capped_note = (
            f"max_new_tokens {options.max_new_tokens} capped to {room} for prompt {index}: its "
            f"{len(self.prompt_ids)} tokens leave room for {room} new tokens in ctx_len {ctx_len}"
            if options.max_new_tokens and options.max_new_tokens > room
            else None
        )
        self.choose = TokenChooser(options.sampling)
        self.tracker = TextTracker(tokenizer, options.stop) if tokenizer is not None else None
        self.generated: list[int] = []
        self.speculation = SpeculationCounts()
        self.finish_reason: str | None = None
        self.times = RequestTimes(
            submitted=time.perf_counter() if submitted is None else submitted, prompt_tokens=len(self.prompt_ids)
        )

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def accept(self, logits: np.ndarray) -> int:
        """Choose the next token from this request's row of logits ``[V]`` and record it."""
        return self.take(self.choose(logits, itertools.chain(self.prompt_ids, self.generated)))

    @property
    def next_position(self) -> int:
        """Where the last generated token is fed to the model (its K/V slot)."""
        return len(self.prompt_ids) + len(self.generated) - 1

    @property
    def context(self) -> list[int]:
        """Every token of the sequence so far: the prompt, then the generated ones."""
        return self.prompt_ids + self.generated

    def take(self, token: int) -> int:
        """Record a token chosen elsewhere (speculative sampling's acceptance rule) and check the stop conditions."""
        token = int(token)
        now = time.perf_counter()
        if self.times.first_token is None:
            self.times.first_token = now
        self.generated.append(token)
        self.times.generated_tokens = len(self.generated)
        if token in self.options.eos_token_ids:
            self.finish(FINISH_EOS, now)
        elif self.tracker is not None and self.tracker.add(token):
            self.finish(FINISH_STOP, now)
        elif len(self.generated) >= self.limit:
            self.finish(FINISH_LENGTH, now)
        return token

    def finish(self, reason: str, now: float | None = None) -> None:
        if self.finish_reason is None:
            self.finish_reason = reason
            self.times.finished = time.perf_counter() if now is None else now

    @property
    def text(self) -> str:
        """The completion's text (ending before a stop string); empty without a tokenizer."""
        return self.tracker.final_text if self.tracker is not None else ""

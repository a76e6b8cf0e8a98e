"""Greedy decoding over any ``DecoderSession``: chunked prefill, right padding with position -1, batches, EOS.

The runtime knows nothing about the backend: it feeds ``[b, s]`` token and position arrays and reads logits. Prompts
are processed in groups of the compiled batch size; a short group is filled with dummy rows whose positions are all
-1 (never attended, never written to a valid slot).

What every run it makes guarantees (graphs may rely on it, e.g. ``group-query-attention``): a row's real tokens sit at
contiguous positions starting at its first column, padding (-1) only after them; all rows of a prefill chunk start
at the same position (chunk ``c`` at ``c * prefill_seq_len``); and a row's slots are written in order, so a position is
always written (by its own run) before any query attends to it.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from qgraph.backend_api import DecoderSession
from qgraph.errors import PromptTooLongError, QGraphError
from qgraph.stats import LatencyStats

PAD_POSITION = -1


@dataclass
class GenerationResult:
    """What ``generate`` returns: new token ids per prompt (EOS included if hit), their text, and latency stats."""

    generated_ids: list[list[int]]
    generated_texts: list[str]
    stats: LatencyStats
    prompt_lengths: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def max_new_tokens(prompt_len: int, ctx_len: int) -> int:
    """Tokens that fit: the first comes from prefill, each later one is fed back at the next position."""
    return ctx_len - prompt_len + 1


def check_fits(prompt_lengths: Sequence[int], ctx_len: int) -> None:
    for index, length in enumerate(prompt_lengths):
        if length == 0:
            raise QGraphError(f"prompt {index} is empty after tokenisation; give at least one token")
        if length >= ctx_len:
            raise PromptTooLongError(
                f"prompt {index} has {length} tokens but the model was compiled with ctx_len={ctx_len}, which must "
                f"hold the prompt and the generated tokens; compile with ctx_len > {length} or shorten the prompt"
            )


@dataclass
class _Timer:
    prefill_s: float = 0.0
    decode_s: float = 0.0
    ttft_s: float | None = None
    device_s: float = 0.0


def _prefill(session: DecoderSession, rows: list[list[int]], pad_token_id: int) -> np.ndarray:
    """Run all prompt chunks; return the logits of each row's last prompt token ``[b, V]``."""
    chunk = session.prefill_seq_len
    lengths = [len(r) for r in rows]
    n_chunks = max(1, -(-max(lengths) // chunk))
    last_logits: list[np.ndarray | None] = [None] * len(rows)
    for c in range(n_chunks):
        ids = np.full((len(rows), chunk), pad_token_id, dtype=np.int64)
        pos = np.full((len(rows), chunk), PAD_POSITION, dtype=np.int64)
        for i, row in enumerate(rows):
            piece = row[c * chunk : (c + 1) * chunk]
            ids[i, : len(piece)] = piece
            pos[i, : len(piece)] = np.arange(c * chunk, c * chunk + len(piece))
        logits = session.run(ids, pos)
        for i, length in enumerate(lengths):
            if length and (length - 1) // chunk == c:
                # [b, 1, V]: the graph kept only each row's last valid token (last-token-logits)
                last_logits[i] = logits[i, 0] if logits.shape[1] == 1 else logits[i, (length - 1) % chunk]
    vocab = next(x for x in last_logits if x is not None).shape[-1]
    return np.stack([x if x is not None else np.zeros(vocab, np.float32) for x in last_logits])


def greedy_generate(
    session: DecoderSession,
    prompt_ids: Sequence[Sequence[int]],
    batch_size: int,
    generation_len: int | None,
    eos_token_ids: set[int],
    pad_token_id: int = 0,
    on_token: Callable[[int, int], None] | None = None,
    start_time: float | None = None,
) -> tuple[list[list[int]], LatencyStats, list[str]]:
    """Greedy decoding of every prompt; ``on_token(prompt_index, token)`` is called as tokens appear.

    Returns the new tokens per prompt, the latency stats and notes (e.g. a generation length capped by ctx_len).
    """
    start = time.perf_counter() if start_time is None else start_time
    lengths = [len(p) for p in prompt_ids]
    check_fits(lengths, session.ctx_len)
    notes = []
    room = min(max_new_tokens(n, session.ctx_len) for n in lengths)
    if generation_len is None:
        generation_len = room
    elif generation_len < 1:
        raise QGraphError(f"generation_len must be at least 1, got {generation_len}")
    elif generation_len > room:
        notes.append(
            f"generation_len {generation_len} capped to {room}: the longest prompt ({max(lengths)} tokens) leaves "
            f"room for {room} new tokens in ctx_len {session.ctx_len}"
        )
        generation_len = room
    timer = _Timer()
    outputs: list[list[int]] = []
    for group_start in range(0, len(prompt_ids), batch_size):
        group = [list(p) for p in prompt_ids[group_start : group_start + batch_size]]
        real = len(group)
        group += [[] for _ in range(batch_size - real)]  # dummy rows: every position is padding
        outputs += _generate_group(
            session,
            group,
            real,
            generation_len,
            eos_token_ids,
            pad_token_id,
            timer,
            start,
            (lambda i, t, base=group_start: on_token(base + i, t)) if on_token else None,
        )
    e2e = time.perf_counter() - start
    generated = sum(len(o) for o in outputs)
    stats = LatencyStats(
        ttft_s=timer.ttft_s or 0.0,
        prefill_s=timer.prefill_s,
        decode_s=timer.decode_s,
        e2e_s=e2e,
        device_s=timer.device_s,
        prompt_tokens=sum(lengths),
        generated_tokens=generated,
        decode_tokens=generated - sum(1 for o in outputs if o),
        batch_size=batch_size,
    )
    return outputs, stats, notes


def _generate_group(
    session: DecoderSession,
    rows: list[list[int]],
    real: int,
    generation_len: int,
    eos_token_ids: set[int],
    pad_token_id: int,
    timer: _Timer,
    start: float,
    on_token: Callable[[int, int], None] | None,
) -> list[list[int]]:
    session.reset(len(rows))
    t0 = time.perf_counter()
    last = _prefill(session, rows, pad_token_id)
    tokens = last.argmax(-1)
    t1 = time.perf_counter()
    timer.prefill_s += t1 - t0
    if timer.ttft_s is None:
        timer.ttft_s = t1 - start
    out: list[list[int]] = [[] for _ in range(real)]
    active = np.zeros(len(rows), dtype=bool)
    active[:real] = True
    next_pos = np.array([len(r) for r in rows], dtype=np.int64)

    def take(step_tokens: np.ndarray) -> None:
        for i in np.flatnonzero(active):
            token = int(step_tokens[i])
            out[i].append(token)
            if on_token:
                on_token(int(i), token)
            if token in eos_token_ids or len(out[i]) >= generation_len:
                active[i] = False

    take(tokens)
    while active.any():
        ids = np.where(active, tokens, pad_token_id).astype(np.int64)[:, None]
        pos = np.where(active, next_pos, PAD_POSITION).astype(np.int64)[:, None]
        logits = session.run(ids, pos)
        tokens = logits[:, -1].argmax(-1)
        next_pos += 1
        take(tokens)
    timer.decode_s += time.perf_counter() - t1
    timer.device_s += session.device_seconds
    return out


class TextStreamer:
    """Prints the text of one prompt as its tokens arrive (decoding the whole sequence so merges stay correct)."""

    def __init__(self, tokenizer, prompt_index: int = 0, stream=None):
        self.tokenizer, self.prompt_index = tokenizer, prompt_index
        self.stream = stream or sys.stdout
        self.tokens: list[int] = []
        self.printed = ""

    def __call__(self, prompt_index: int, token: int) -> None:
        if prompt_index != self.prompt_index:
            return
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if text.startswith(self.printed) and not text.endswith("\ufffd"):
            self.stream.write(text[len(self.printed) :])
            self.stream.flush()
            self.printed = text

    def end(self) -> None:
        self.stream.write("\n")
        self.stream.flush()

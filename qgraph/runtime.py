"""Static-batch decoding over any ``DecoderSession``: chunked prefill, right padding with position -1, batches, EOS.

The runtime knows nothing about the backend: it feeds ``[b, s]`` token and position arrays and reads logits. Requests
are processed in groups of the compiled batch size; a short group is filled with dummy rows whose positions are all
-1 (never attended, never written to a valid slot). Each request chooses its own tokens (``Request.accept``: greedy,
or sampling with its own seeded generator) and stops on its own (EOS, a stop string, its token limit).

What every run it makes guarantees (graphs may rely on it, e.g. ``group-query-attention``): a row's real tokens sit at
contiguous positions starting at its first column, padding (-1) only after them; all rows of a prefill chunk start
at the same position (chunk ``c`` at ``c * prefill_seq_len``); and a row's slots are written in order, so a position is
always written (by its own run) before any query attends to it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from qgraph.backend_api import DecoderSession
from qgraph.decoding import GenerationOptions
from qgraph.errors import QGraphError
from qgraph.request import Request, check_prompt_fits, room_for_new_tokens
from qgraph.stats import LatencyStats

PAD_POSITION = -1


@dataclass
class GenerationResult:
    """What ``generate`` returns: new token ids per prompt (EOS included if hit), their text, and latency stats.

    ``finish_reasons[i]`` is ``"eos"``, ``"stop"`` (a stop string; the text ends before it) or ``"length"``;
    ``request_stats[i]`` holds that prompt's own queue time, TTFT and decode tokens/s.
    """

    generated_ids: list[list[int]]
    generated_texts: list[str]
    stats: LatencyStats
    prompt_lengths: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    finish_reasons: list[str] = field(default_factory=list)
    request_stats: list[dict[str, float]] = field(default_factory=list)


@dataclass
class StreamEvent:
    """One step of ``model.stream``: the new text since the last event and the tokens behind it; the last event of a
    completion also has ``finish_reason`` and ``stats``."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    stats: LatencyStats | None = None


def max_new_tokens(prompt_len: int, ctx_len: int) -> int:
    """Tokens that fit: the first comes from prefill, each later one is fed back at the next position."""
    return room_for_new_tokens(prompt_len, ctx_len)


def check_fits(prompt_lengths: Sequence[int], ctx_len: int) -> None:
    for index, length in enumerate(prompt_lengths):
        check_prompt_fits(length, ctx_len, index)


@dataclass
class StepTimer:
    prefill_s: float = 0.0
    decode_s: float = 0.0
    first_token: float | None = None
    device_s: float = 0.0
    # speculative decoding: guesses checked, guesses accepted, verification runs that checked any, rows in them
    proposed: int = 0
    accepted: int = 0
    verify_runs: int = 0
    verified_rows: int = 0


def logits_positions(session: DecoderSession, logits: np.ndarray) -> int | None:
    """How a run's logits are laid out: ``None`` when they hold every column ``[b, s, V]``; ``n`` when they hold the
    last ``min(s, n)`` tokens of each row, its last valid token last (``last-token-logits``: 1, or ``k + 1`` on a
    model compiled for speculative decoding)."""
    kept = getattr(session, "logits_positions", None)
    return kept if kept is not None else (1 if logits.shape[1] == 1 else None)


def prefill_rows(
    session: DecoderSession,
    rows: list[list[int]],
    pad_token_id: int,
    run: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
) -> np.ndarray:
    """Run all prompt chunks (through ``run``, ``session.run`` by default); return the logits of each row's last
    prompt token ``[b, V]``."""
    run = run or session.run
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
        logits = run(ids, pos)
        kept = logits_positions(session, logits)
        for i, length in enumerate(lengths):
            if length and (length - 1) // chunk == c:
                last_logits[i] = logits[i, -1] if kept else logits[i, (length - 1) % chunk]
    vocab = next(x for x in last_logits if x is not None).shape[-1]
    return np.stack([x if x is not None else np.zeros(vocab, np.float32) for x in last_logits])


def static_batch_steps(
    session: DecoderSession,
    requests: Sequence[Request],
    batch_size: int,
    pad_token_id: int,
    timer: StepTimer,
) -> Iterator[list[tuple[Request, int]]]:
    """Run the requests in groups of ``batch_size``; yield the ``(request, token)`` pairs of every step."""
    for group_start in range(0, len(requests), batch_size):
        yield from _group_steps(
            session, list(requests[group_start : group_start + batch_size]), batch_size, pad_token_id, timer
        )


def prefill_group(
    session: DecoderSession,
    group: list[Request],
    batch_size: int,
    pad_token_id: int,
    timer: StepTimer,
    before_first_token: Callable[[int], None] | None = None,
) -> tuple[list[list[int]], list[tuple[Request, int]], float]:
    """Prefill a static group (short groups filled with all-padding dummy rows) and choose each request's first token.

    ``before_first_token(rows)`` runs after the prefill and before the first tokens are chosen (still prompt time, in
    TTFT). Returns the rows, the ``(request, first token)`` pairs and the time the first tokens were ready."""
    rows = [r.prompt_ids for r in group] + [[] for _ in range(batch_size - len(group))]  # dummy rows: all padding
    session.reset(len(rows))
    t0 = time.perf_counter()
    for r in group:
        r.times.admitted = t0
    last = prefill_rows(session, rows, pad_token_id)
    if before_first_token is not None:
        before_first_token(len(rows))
    taken = [(r, r.accept(last[i])) for i, r in enumerate(group)]
    t1 = time.perf_counter()
    timer.prefill_s += t1 - t0
    if timer.first_token is None:
        timer.first_token = t1
    return rows, taken, t1


def transient_run(session: DecoderSession) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """The session's run for a loop that reads each run's logits before the next one: ``run_transient`` where the
    session has it (its logits may be a buffer the next run rewrites, not a copy), else ``run``."""
    return getattr(session, "run_transient", session.run)


def _group_steps(
    session: DecoderSession, group: list[Request], batch_size: int, pad_token_id: int, timer: StepTimer
) -> Iterator[list[tuple[Request, int]]]:
    rows, taken, t1 = prefill_group(session, group, batch_size, pad_token_id, timer)
    try:
        yield taken
        # the step's inputs are updated in place, element by element, and a finished row becomes padding: every
        # numpy call between two runs costs tens of microseconds on the caches the run has just flushed, a visible
        # share of a ~5 ms int4 step (benchmarks/step_overhead.py)
        ids = np.full((len(rows), 1), pad_token_id, dtype=np.int64)
        pos = np.full((len(rows), 1), PAD_POSITION, dtype=np.int64)
        live = []
        for i, r in enumerate(group):
            if not r.done:
                ids[i, 0], pos[i, 0] = r.generated[-1], len(r.prompt_ids)
                live.append((i, r))
        run = transient_run(session)
        argmax_only = all(r.choose.argmax_only for r in group)
        while live:
            logits = run(ids, pos)
            # one argmax over the batch gives every greedy row the token its own accept would choose
            chosen = logits[:, -1].argmax(-1).tolist() if argmax_only else None
            taken, ended = [], False
            for i, r in live:
                token = r.take(chosen[i]) if chosen is not None else r.accept(logits[i, -1])
                taken.append((r, token))
                if r.done:
                    ids[i, 0], pos[i, 0], ended = pad_token_id, PAD_POSITION, True
                else:
                    ids[i, 0] = token
                    pos[i, 0] += 1
            if ended:
                live = [(i, r) for i, r in live if not r.done]
            yield taken
    finally:
        timer.decode_s += time.perf_counter() - t1
        timer.device_s += session.device_seconds


def latency_stats(requests: Sequence[Request], timer: StepTimer, start: float, batch_size: int) -> LatencyStats:
    generated = sum(len(r.generated) for r in requests)
    return LatencyStats(
        ttft_s=(timer.first_token - start) if timer.first_token is not None else 0.0,
        prefill_s=timer.prefill_s,
        decode_s=timer.decode_s,
        e2e_s=time.perf_counter() - start,
        device_s=timer.device_s,
        prompt_tokens=sum(len(r.prompt_ids) for r in requests),
        generated_tokens=generated,
        decode_tokens=generated - sum(1 for r in requests if r.generated),
        batch_size=batch_size,
        proposed_tokens=timer.proposed,
        accepted_tokens=timer.accepted,
        verify_runs=timer.verify_runs,
        verified_rows=timer.verified_rows,
    )


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
    """Greedy decoding of token-id prompts; ``on_token(prompt_index, token)`` is called as tokens appear.

    Returns the new tokens per prompt, the latency stats and notes (e.g. a generation length capped by ctx_len).
    """
    if generation_len is not None and generation_len < 1:
        raise QGraphError(f"generation_len must be at least 1, got {generation_len}")
    options = GenerationOptions(max_new_tokens=generation_len, eos_token_ids=frozenset(eos_token_ids))
    start = time.perf_counter() if start_time is None else start_time
    requests = [Request(p, options, session.ctx_len, index=i, submitted=start) for i, p in enumerate(prompt_ids)]
    stats, notes = run_static(session, requests, batch_size, pad_token_id, start, on_token)
    return [r.generated for r in requests], stats, notes


def run_static(
    session: DecoderSession,
    requests: Sequence[Request],
    batch_size: int,
    pad_token_id: int,
    start: float,
    on_token: Callable[[int, int], None] | None = None,
) -> tuple[LatencyStats, list[str]]:
    """Run every request to its end in static batches; returns the latency stats and notes."""
    timer = StepTimer()
    for taken in static_batch_steps(session, requests, batch_size, pad_token_id, timer):
        if on_token:
            for request, token in taken:
                on_token(request.index, token)
    notes = [r.capped_note for r in requests if r.capped_note]
    return latency_stats(requests, timer, start, batch_size), notes

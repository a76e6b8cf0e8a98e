"""Speculative decoding: a proposer guesses up to ``k`` next tokens, the target verifies them all in one run.

Why: batch-1 decode reads every weight once per token and is bound by memory bandwidth; a run of ``k + 1`` tokens
reads them once too and costs little more, so each accepted guess is a token for (almost) free.

A verification run feeds each row its last accepted token followed by its guesses (rows with fewer guesses padded
with position -1) and reads the logits of all of them (the model is compiled with ``num_speculative_tokens >= k``:
``last-token-logits`` keeps ``k + 1`` positions). Each row then takes tokens one by one through its own ``Request``:

- greedy: the target's choice at each position, as long as it equals the guess there, then the first token where it
  differs (or the bonus token after the last guess) — exactly plain greedy's tokens;
- sampling: the standard speculative-sampling acceptance rule (``qgraph.speculative_sampling``) against the request's
  own warped distributions, which leaves the distribution of the tokens unchanged.

Every token goes through ``Request.take``/``accept``, so EOS, stop strings, ``max_new_tokens`` and ``ctx_len`` cut the
accepted tokens exactly where plain decoding stops. Rejected guesses need no rollback: their K/V slots lie past the
row's next position, are never attended (mask ``k <= p``) and the next run overwrites them.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence

import numpy as np

from qgraph.backend_api import DecoderSession
from qgraph.errors import QGraphError
from qgraph.proposers import DraftModel, PromptLookup, Proposal, Proposer
from qgraph.request import Request
from qgraph.runtime import PAD_POSITION, StepTimer, logits_positions, prefill_group


def max_speculative_tokens(session: DecoderSession) -> int:
    """The most guesses one verification run of this session can check (its logits keep ``k + 1`` positions)."""
    kept = getattr(session, "logits_positions", None)
    return session.ctx_len - 1 if kept is None else kept - 1


def check_speculation(session: DecoderSession, k: int, asked_as: str) -> None:
    """Refuse ``k`` guesses on a model whose verification runs cannot check them, saying what to compile with."""
    most = max_speculative_tokens(session)
    if k > most:
        compiled = f"num_speculative_tokens={most}" if most > 0 else "without num_speculative_tokens"
        raise QGraphError(
            f"{asked_as} needs a model compiled with num_speculative_tokens >= {k}, but this one was compiled "
            f"{compiled}: call model.compile(..., num_speculative_tokens={k})"
        )


def speculative_batch_steps(
    session: DecoderSession,
    requests: Sequence[Request],
    batch_size: int,
    pad_token_id: int,
    timer: StepTimer,
    proposer: Proposer,
    num_tokens: int,
) -> Iterator[list[tuple[Request, int]]]:
    """Like ``runtime.static_batch_steps``, with speculative decode steps: each yield may hold several tokens of a
    request (in order)."""
    for group_start in range(0, len(requests), batch_size):
        group = list(requests[group_start : group_start + batch_size])
        yield from _group_steps(session, group, batch_size, pad_token_id, timer, proposer, num_tokens)


def _group_steps(
    session: DecoderSession,
    group: list[Request],
    batch_size: int,
    pad_token_id: int,
    timer: StepTimer,
    proposer: Proposer,
    num_tokens: int,
) -> Iterator[list[tuple[Request, int]]]:
    def admit_to_proposer(rows: int) -> None:
        # the proposer takes the prompts in before the first token: a draft model's prefill is prompt processing
        # (TTFT), not decode time
        proposer.reset(rows)
        for i, r in enumerate(group):
            proposer.admit(i, r)

    rows, taken, t1 = prefill_group(session, group, batch_size, pad_token_id, timer, admit_to_proposer)
    try:
        yield taken
        while True:
            live = [r if r is not None and not r.done else None for r in rows_of(group, len(rows))]
            if not any(r is not None for r in live):
                break
            yield verify_step(session, live, proposer, [num_tokens] * len(live), pad_token_id, timer)
    finally:
        timer.decode_s += time.perf_counter() - t1
        timer.device_s += session.device_seconds + getattr(proposer, "device_seconds", 0.0)


def rows_of(group: list[Request], rows: int) -> list[Request | None]:
    """The group's requests by batch row (None: a dummy row of padding)."""
    return [group[i] if i < len(group) else None for i in range(rows)]


def run_width(session: DecoderSession, num_tokens: int) -> int:
    """Columns of a verification run: what the session's logits keep (the shape a static-shape target compiled), or
    ``num_tokens + 1``."""
    kept = getattr(session, "logits_positions", None)
    return num_tokens + 1 if kept is None else max(kept, num_tokens + 1)


def guess_limits(live: Sequence[Request | None], ks: Sequence[int], width: int, ctx_len: int) -> list[int]:
    """How many guesses each row may be checked on: at most its ``k`` and no more than it could still accept (its
    token limit). Every row's columns of the ``width``-wide run, its padding too, must stay inside ``ctx_len``: the
    last steps before a row of the batch reaches the end are plain decode steps."""
    positions = [r.next_position for r in live if r is not None]
    if not positions or max(positions) + width > ctx_len:
        return [0] * len(live)
    return [
        0 if r is None else max(0, min(k, width - 1, r.limit - len(r.generated) - 1))
        for r, k in zip(live, ks, strict=True)
    ]


def verify_step(
    session: DecoderSession,
    live: Sequence[Request | None],
    proposer: Proposer,
    ks: Sequence[int],
    pad_token_id: int,
    timer: StepTimer,
) -> list[tuple[Request, int]]:
    """One verification run over the live rows (None: a finished or empty row), each row checking up to its own
    ``ks[i]`` guesses; returns the tokens taken, in order per row."""
    width = run_width(session, max(ks))
    limits = guess_limits(live, ks, width, session.ctx_len)
    proposals = proposer.propose(live, limits) if any(limits) else [Proposal() for _ in live]
    guesses = [_in_vocabulary(p.tokens[:limit], session) for p, limit in zip(proposals, limits, strict=True)]
    width = width if any(guesses) else 1  # trailing padding columns cost nothing on ORT: it drops them
    ids = np.full((len(live), width), pad_token_id, dtype=np.int64)
    pos = np.full((len(live), width), PAD_POSITION, dtype=np.int64)
    for i, r in enumerate(live):
        if r is not None:
            fed = [r.generated[-1], *guesses[i]]
            ids[i, : len(fed)] = fed
            pos[i, : len(fed)] = np.arange(r.next_position, r.next_position + len(fed))
    start = time.perf_counter()
    logits = session.run(ids, pos)
    observe_run = getattr(proposer, "observe_run", None)  # a proposer that prices its guesses by run times
    if observe_run is not None:
        observe_run(1 + max(map(len, guesses)), time.perf_counter() - start)
    kept = logits_positions(session, logits)
    taken: list[tuple[Request, int]] = []
    proposed_any = False
    for i, r in enumerate(live):
        if r is None:
            continue
        count = 1 + len(guesses[i])
        if kept is not None and count > logits.shape[1]:
            raise QGraphError(
                f"the verification run returned logits for {logits.shape[1]} positions per row, {count} were needed"
            )
        rows = logits[i, logits.shape[1] - count :] if kept is not None else logits[i, :count]
        probs = proposals[i].probs[: len(guesses[i])] if proposals[i].probs is not None else None
        tokens = take_verified(r, rows, guesses[i], probs)
        if guesses[i]:
            accepted = _matching_prefix(tokens, guesses[i])
            proposed_any = True
            proposer.feedback(i, len(guesses[i]), accepted)
            for counts in (timer, r.speculation):
                counts.proposed += len(guesses[i])
                counts.accepted += accepted
                counts.verified_rows += 1
        taken += [(r, t) for t in tokens]
    timer.verify_runs += proposed_any
    return taken


class RequestProposers:
    """Rows whose requests choose their own proposer (continuous batching): prompt lookup with each request's ``k``,
    or a draft model per assistant model (each on its own session of the draft's artifact, with one row per slot).
    Behind the ``Proposer`` interface: each row's guesses come from its own request's choice."""

    def __init__(self, rows: int, ctx_len: int):
        self.rows = rows
        self.lookup = PromptLookup(ctx_len)  # each row's k arrives as its limit
        self.lookup.reset(rows)
        self.drafts: dict[int, DraftModel] = {}
        self.chosen: list[Proposer | None] = [None] * rows

    def reset(self, rows: int) -> None:
        pass  # rows live as long as the engine: admit starts each one afresh

    def _draft(self, model) -> DraftModel:
        if id(model) not in self.drafts:
            if getattr(model, "artifact", None) is None:
                raise QGraphError("assistant_model is not compiled: call assistant_model.compile(...) first")
            draft = DraftModel(model, self.lookup.num_tokens, session=model.artifact.load())
            draft.reset(self.rows)
            self.drafts[id(model)] = draft
        return self.drafts[id(model)]

    def admit(self, row: int, request: Request) -> None:
        options = request.options
        chosen = None
        if options.prompt_lookup_num_tokens is not None:
            chosen = self.lookup
        elif options.assistant_model is not None:
            chosen = self._draft(options.assistant_model)
        self.chosen[row] = chosen
        if chosen is not None:
            chosen.admit(row, request)

    def propose(self, requests: Sequence[Request | None], limits: Sequence[int]) -> list[Proposal]:
        proposals = [Proposal() for _ in requests]
        for proposer in {id(p): p for p in self.chosen if p is not None}.values():
            mine = [r if self.chosen[i] is proposer else None for i, r in enumerate(requests)]
            if any(r is not None and limits[i] for i, r in enumerate(mine)):
                for i, proposal in enumerate(proposer.propose(mine, limits)):
                    if mine[i] is not None:
                        proposals[i] = proposal
        return proposals

    def feedback(self, row: int, proposed: int, accepted: int) -> None:
        if self.chosen[row] is not None:
            self.chosen[row].feedback(row, proposed, accepted)

    def observe_run(self, width: int, seconds: float) -> None:
        self.lookup.observe_run(width, seconds)

    @property
    def device_seconds(self) -> float:
        return sum(d.device_seconds for d in self.drafts.values())


def guesses_asked(request: Request, compiled: int) -> int:
    """The guesses per verification a request asks for (0: it decodes plainly)."""
    options = request.options
    if options.prompt_lookup_num_tokens is not None:
        return options.prompt_lookup_num_tokens
    if options.assistant_model is not None:
        return options.num_assistant_tokens or compiled
    return 0


def take_verified(
    request: Request, logits: np.ndarray, guesses: Sequence[int], guess_probs: np.ndarray | None
) -> list[int]:
    """The tokens ``request`` takes from one verification: ``logits[j]`` are the target's logits after the row's last
    token and the first ``j`` guesses. Stops where the request stops (EOS, stop string, length)."""
    if not guesses or not request.options.sampling.do_sample:
        tokens = []
        for j in range(len(guesses) + 1):
            tokens.append(request.accept(logits[j]))
            if request.done or j == len(guesses) or tokens[-1] != guesses[j]:
                break
        return tokens
    from qgraph.speculative_sampling import speculative_accept

    context = request.context
    target = np.stack([request.choose.distribution(logits[j], context + list(guesses[:j])) for j in range(len(logits))])
    tokens = []
    for token in speculative_accept(target, list(guesses), guess_probs, request.choose.rng):
        tokens.append(request.take(token))
        if request.done:
            break
    return tokens


def _in_vocabulary(tokens: list[int], session: DecoderSession) -> list[int]:
    """The guesses up to the first the target cannot embed (a draft's vocabulary may be padded larger)."""
    vocab = getattr(session, "vocab_size", None)
    if vocab is None:
        return tokens
    for n, token in enumerate(tokens):
        if not 0 <= token < vocab:
            return tokens[:n]
    return tokens


def _matching_prefix(tokens: Sequence[int], guesses: Sequence[int]) -> int:
    n = 0
    while n < min(len(tokens), len(guesses)) and tokens[n] == guesses[n]:
        n += 1
    return n

"""Proposers for speculative decoding: guesses of the next few tokens that the target model verifies in one run.

A proposer serves the rows of a batch (a static group, or the continuous-batching engine's slots). The speculative
loop (``qgraph.speculative``) tells it when a request starts in a row (``admit``), asks it for up to ``limit`` tokens
for every active row at once (``propose``) and reports how many of them the target accepted (``feedback``). Whatever
a proposer guesses, greedy output is the target's own: a wrong guess costs time, never a different token. A proposer
that prices its guesses may also take ``observe_run(width, seconds)``: the loop reports every run's time by width.

- ``PromptLookup``: the tokens that followed the last occurrence of the sequence's last n tokens in the prompt and
  the generated text (no second model; HF transformers' ``prompt_lookup_num_tokens``). It proposes as many as a cost
  model says pay (none when none do) and backs off when its guesses keep failing, so text that does not copy from its
  input runs at plain decode speed.
- ``DraftModel``: a smaller (or quantized) qgraph-compiled model with the same tokenizer proposes greedily (or
  samples, with its distributions returned for speculative sampling); its own KV buffers are kept in step with the
  accepted tokens (HF transformers' ``assistant_model``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from qgraph.errors import QGraphError
from qgraph.run_costs import RunCosts
from qgraph.runtime import PAD_POSITION, logits_positions, prefill_rows
from qgraph.sampling import apply_repetition_penalty, sampling_probabilities

if TYPE_CHECKING:
    from qgraph.request import Request


@dataclass
class Proposal:
    """Proposed tokens for one row; ``probs`` ``[len(tokens), V]`` are the distributions they were drawn from (None
    for a deterministic proposer: each token had probability 1)."""

    tokens: list[int] = field(default_factory=list)
    probs: np.ndarray | None = None


class Proposer(Protocol):
    """What the speculative loop needs of a proposer (rows are batch rows / engine slots)."""

    def reset(self, rows: int) -> None:
        """A new set of ``rows`` rows (a static group or the engine's slots); forget every row's state."""

    def admit(self, row: int, request: Request) -> None:
        """``request`` starts in ``row``: its prompt is prefilled (its first token may not be chosen yet)."""

    def propose(self, requests: Sequence[Request | None], limits: Sequence[int]) -> list[Proposal]:
        """Up to ``limits[i]`` tokens to follow ``requests[i].context`` (None or limit 0: propose nothing)."""

    def feedback(self, row: int, proposed: int, accepted: int) -> None:
        """The target accepted ``accepted`` of the ``proposed`` tokens of ``row``'s last proposal."""


# -- prompt lookup ----------------------------------------------------------------------------------------------


PRIOR_ACCEPTED, PRIOR_REJECTED = 1.0, 1.0  # before any evidence: p = 0.5


@dataclass
class _Acceptance:
    """Decayed counts of one kind of guess: guesses accepted, and verifications that rejected one. Under a geometric
    model (each next guess right with probability ``p`` while the ones before it were) ``accepted / (accepted +
    rejected)`` is the maximum-likelihood ``p``; the decay lets it follow text that starts or stops copying, and while
    such guesses are not checked it relaxes toward the prior, so they are tried again now and then."""

    accepted: float = PRIOR_ACCEPTED
    rejected: float = PRIOR_REJECTED

    @property
    def rate(self) -> float:
        return self.accepted / (self.accepted + self.rejected)

    def update(self, proposed: int, accepted: int, decay: float) -> None:
        self.accepted = decay * self.accepted + accepted
        self.rejected = decay * self.rejected + (accepted < proposed)

    def relax(self, decay: float) -> None:
        self.accepted = decay * self.accepted + (1 - decay) * PRIOR_ACCEPTED
        self.rejected = decay * self.rejected + (1 - decay) * PRIOR_REJECTED


@dataclass
class _LookupRow:
    misses: int = 0  # verifications in a row that accepted nothing
    pause: int = 0  # steps left without proposing (backing off after misses)
    by_ngram: dict[int, _Acceptance] = field(default_factory=dict)  # acceptance by the length of the matched n-gram
    last_ngram: int = 0  # the matched length of the row's last proposal


def guesses_worth_checking(rate: float, limit: int, cost: Callable[[int], float]) -> int:
    """The number of guesses ``n`` (0..limit) with the most expected tokens per unit of run time: a run checking
    ``n`` guesses costs ``cost(n)`` one-token runs and, when each next guess is right with probability ``rate``,
    yields ``1 + rate + ... + rate**n`` tokens. 0: no count beats a plain decode step."""
    best, best_value, expected, power = 0, 1.0, 1.0, 1.0
    for n in range(1, limit + 1):
        power *= rate
        expected += power
        value = expected / cost(n)
        if value > best_value:
            best, best_value = n, value
    return best


class PromptLookup:
    """n-gram prompt lookup: match the last ``n`` tokens (``max_ngram`` down to ``min_ngram``) against everything
    before them, most recent occurrence first, and propose what followed it.

    How many of the following tokens it proposes (at most ``num_tokens``, possibly none) comes from a cost model: the
    row's recent acceptance of guesses after a match of that length (decayed by ``decay`` per verification) gives the
    tokens a proposal of ``n`` is expected to yield, ``costs`` (``qgraph.run_costs.RunCosts``, learned from the
    verification runs' own times) what its run costs next to a plain step; it proposes the ``n`` with the most
    expected tokens per unit of time, nothing when no ``n`` beats a plain step. Text that copies its input gets long
    proposals, text that does not gets few or none; unchecked estimates relax toward the prior, so guesses are tried
    again now and then.

    Backing off: after a verification that accepted nothing the row pauses for ``2 ** misses`` steps (at most
    ``max_pause``), so on text that does not repeat its input the loop spends almost every step as a plain decode;
    an accepted guess ends the back-off.
    """

    def __init__(
        self,
        num_tokens: int,
        max_ngram: int = 3,
        min_ngram: int = 1,
        max_pause: int = 16,
        decay: float = 0.8,
        costs: RunCosts | None = None,
    ):
        if min_ngram < 1 or max_ngram < min_ngram:
            raise QGraphError(f"prompt lookup n-gram sizes must satisfy 1 <= min <= max, got {min_ngram}..{max_ngram}")
        if not 0 <= decay <= 1:
            raise QGraphError(f"prompt lookup needs 0 <= decay <= 1, got {decay}")
        self.num_tokens = num_tokens
        self.max_ngram, self.min_ngram, self.max_pause = max_ngram, min_ngram, max_pause
        self.decay = decay
        self.costs = costs if costs is not None else RunCosts()
        self._rows: list[_LookupRow] = []

    def reset(self, rows: int) -> None:
        self._rows = [_LookupRow() for _ in range(rows)]

    def admit(self, row: int, request: Request) -> None:
        self._rows[row] = _LookupRow()

    def observe_run(self, width: int, seconds: float) -> None:
        """A verification (or plain) run fed ``width`` tokens per row at most and took ``seconds``."""
        self.costs.observe(width, seconds)

    def propose(self, requests: Sequence[Request | None], limits: Sequence[int]) -> list[Proposal]:
        proposals = []
        for row, (request, limit) in enumerate(zip(requests, limits, strict=True)):
            state = self._rows[row]
            limit = min(limit, self.num_tokens)
            if request is None or limit < 1:
                proposals.append(Proposal())
            elif state.pause > 0:
                state.pause -= 1
                proposals.append(Proposal())
            else:
                follow, ngram = match(request.context, limit, self.max_ngram, self.min_ngram)
                if follow:
                    acceptance = state.by_ngram.setdefault(ngram, _Acceptance())
                    # sampled tokens depend on how many guesses each run checks: a seeded request repeats only if
                    # its proposals do not depend on run times
                    cost = self.costs.prior if request.options.sampling.do_sample else self.costs.relative
                    follow = follow[: guesses_worth_checking(acceptance.rate, len(follow), cost)]
                    if follow:
                        state.last_ngram = ngram
                    else:
                        acceptance.relax(self.decay)
                proposals.append(Proposal(follow))
        return proposals

    def feedback(self, row: int, proposed: int, accepted: int) -> None:
        state = self._rows[row]
        if proposed == 0:
            return
        state.by_ngram.setdefault(state.last_ngram, _Acceptance()).update(proposed, accepted, self.decay)
        if accepted == 0:
            state.misses += 1
            state.pause = min(2**state.misses, self.max_pause)
        else:
            state.misses = 0


def lookup(context: Sequence[int], limit: int, max_ngram: int = 3, min_ngram: int = 1) -> list[int]:
    """The up to ``limit`` tokens that followed the most recent earlier occurrence of the context's last ``n`` tokens
    (longest ``n`` first); empty when no n-gram recurs."""
    return match(context, limit, max_ngram, min_ngram)[0]


def match(context: Sequence[int], limit: int, max_ngram: int = 3, min_ngram: int = 1) -> tuple[list[int], int]:
    """``lookup``'s tokens and the length ``n`` of the n-gram they follow (0: no match)."""
    tokens = np.asarray(context, dtype=np.int64)
    length = tokens.size
    for n in range(min(max_ngram, length - 1), min_ngram - 1, -1):
        tail = tokens[length - n :]
        # starts of earlier windows equal to the tail; the window must end before the tail itself
        starts = np.flatnonzero(tokens[: length - n] == tail[0])
        for start in starts[::-1]:
            if start + n <= length - 1 and np.array_equal(tokens[start : start + n], tail):
                follow = tokens[start + n : start + n + limit]
                if follow.size:
                    return [int(t) for t in follow], n
    return [], 0


# -- draft model ------------------------------------------------------------------------------------------------


@dataclass
class _DraftRow:
    seen: int = -1  # tokens of the row's sequence whose K/V the draft holds (-1: the row is not drafted for)
    fed_context: int = 0  # context length at the last proposal (the draft's guesses sit after it)
    rng: np.random.Generator | None = None


class DraftModel:
    """A qgraph-compiled draft model proposes by decoding greedily (or sampling) on its own session.

    The draft's KV buffers hold one row per target row. A proposal first feeds the draft the row's tokens it has not
    seen (the target's corrected or bonus token, and any accepted guesses it did not feed itself), then decodes the
    guesses. Guesses the target rejects need no rollback: their slots lie past the row's next position and the next
    catch-up run overwrites them. A live row that sits out a run as padding may have its slots from the run's largest
    start on overwritten (``group-query-attention`` writes padding rows there): it is fed again from that position.

    A row's guesses end after the first one the draft gives a probability below ``confidence_threshold``
    (transformers' ``assistant_confidence_threshold``, 0.4 by default): a guess the draft itself doubts is likely
    rejected, and drafting past it costs draft runs and verification width for nothing.
    """

    def __init__(self, model: Any, num_tokens: int, session: Any = None, confidence_threshold: float = 0.4):
        if getattr(model, "artifact", None) is None:
            raise QGraphError(
                "assistant_model is not compiled: call assistant_model.compile(...) before using it as a draft"
            )
        self.model = model
        self.num_tokens = num_tokens
        self.confidence_threshold = confidence_threshold
        self.session = session if session is not None else model._loaded_session()  # or a session of its own
        if not hasattr(self.session, "run_row"):
            raise QGraphError(
                f"the assistant model's backend session ({type(self.session).__name__}) cannot prefill one row at a "
                "time (no run_row); compile the assistant model for backend 'ort'"
            )
        self.ctx_len = self.session.ctx_len
        self._rows: list[_DraftRow] = []

    @contextlib.contextmanager
    def in_use(self):
        """Hold the draft model's session for a generation (its own generate calls wait meanwhile)."""
        with self.model._generate_lock:
            yield self

    @property
    def device_seconds(self) -> float:
        """Time inside the draft's run calls since the last reset."""
        return self.session.device_seconds

    def reset(self, rows: int) -> None:
        self.session.reset(rows)
        self._rows = [_DraftRow() for _ in range(rows)]

    def admit(self, row: int, request: Request) -> None:
        seed = request.options.sampling.seed
        state = _DraftRow(rng=np.random.default_rng(None if seed is None else [seed, 1]))
        self._rows[row] = state
        if len(request.prompt_ids) >= self.ctx_len:
            return  # does not fit the draft: it never proposes for this row
        run_row = self.session.run_row
        prefill_rows(self.session, [request.prompt_ids], 0, lambda ids, pos: run_row(row, ids, pos))
        state.seen = len(request.prompt_ids)

    def feedback(self, row: int, proposed: int, accepted: int) -> None:
        state = self._rows[row]
        if proposed and state.seen >= 0:
            state.seen = min(state.seen, state.fed_context + accepted)

    def propose(self, requests: Sequence[Request | None], limits: Sequence[int]) -> list[Proposal]:
        rows = len(requests)
        contexts = [r.context if r is not None else [] for r in requests]
        states = self._rows
        # a row is drafted for when it asks for tokens and its catch-up and guesses fit the draft's buffers
        wanted = [min(limits[i], self.num_tokens, self.ctx_len - len(contexts[i]) + 1) for i in range(rows)]
        active = [requests[i] is not None and states[i].seen >= 0 and wanted[i] > 0 for i in range(rows)]
        if not any(active):
            return [Proposal() for _ in range(rows)]
        width = max(len(contexts[i]) - states[i].seen for i in range(rows) if active[i])
        for i in range(rows):
            active[i] = active[i] and states[i].seen + width <= self.ctx_len
        if not any(active):
            return [Proposal() for _ in range(rows)]
        # every drafted row guesses as many tokens as the longest (extra ones are dropped): a live row left out of a
        # run as padding would lose K/V (see the class docstring)
        count = min(
            max(wanted[i] for i in range(rows) if active[i]),
            *(self.ctx_len - len(contexts[i]) + 1 for i in range(rows) if active[i]),
        )
        width = max(len(contexts[i]) - states[i].seen for i in range(rows) if active[i])
        ids = np.zeros((rows, width), dtype=np.int64)
        pos = np.full((rows, width), PAD_POSITION, dtype=np.int64)
        for i in range(rows):
            if active[i]:
                unseen = len(contexts[i]) - states[i].seen
                ids[i, :unseen] = contexts[i][states[i].seen :]
                pos[i, :unseen] = np.arange(states[i].seen, len(contexts[i]))
        last = self._run(ids, pos, active)
        guesses: list[list[int]] = [[] for _ in range(rows)]
        dists: list[list[np.ndarray]] = [[] for _ in range(rows)]
        keep = list(wanted)  # guesses kept per row: cut after the first one the draft is not confident of
        for step in range(count):
            for i in range(rows):
                if active[i]:
                    token, dist, confidence = self._choose(requests[i], states[i], last[i], contexts[i] + guesses[i])
                    guesses[i].append(token)
                    if dist is not None:
                        dists[i].append(dist)
                    if confidence < self.confidence_threshold:
                        keep[i] = min(keep[i], step + 1)
            if step == count - 1 or all(keep[i] <= step + 1 for i in range(rows) if active[i]):
                break
            ids = np.zeros((rows, 1), dtype=np.int64)
            pos = np.full((rows, 1), PAD_POSITION, dtype=np.int64)
            for i in range(rows):
                if active[i]:
                    ids[i, 0], pos[i, 0] = guesses[i][-1], len(contexts[i]) + step
            last = self._run(ids, pos, active)
        proposals = []
        for i in range(rows):
            if not active[i]:
                proposals.append(Proposal())
                continue
            states[i].fed_context = len(contexts[i])
            n = keep[i]
            proposals.append(Proposal(guesses[i][:n], np.stack(dists[i][:n]) if dists[i] else None))
        return proposals

    def _run(self, ids: np.ndarray, pos: np.ndarray, active: list[bool]) -> list[np.ndarray]:
        """One draft run; each active row's logits at its last fed token. Rows fed nothing lose their slots from the
        run's largest start on."""
        logits = self.session.run(ids, pos)
        kept = logits_positions(self.session, logits)
        largest_start = int(pos[:, 0].max())
        last = []
        for i, state in enumerate(self._rows):
            fed = int((pos[i] >= 0).sum())
            if fed:
                state.seen = int(pos[i, fed - 1]) + 1
                last.append(logits[i, -1] if kept else logits[i, fed - 1])
            else:
                if state.seen > largest_start:
                    state.seen = largest_start
                last.append(None)
        return last

    @staticmethod
    def _choose(
        request: Request, state: _DraftRow, logits: np.ndarray, previous: list[int]
    ) -> tuple[int, np.ndarray | None, float]:
        """The draft's guess: greedy on the request's penalised logits, or a draw from its warped distribution; and
        the draft's probability of it."""
        options = request.options.sampling
        scores = apply_repetition_penalty(logits, previous, options.repetition_penalty)
        if not options.do_sample:
            token = int(np.argmax(scores))
            return token, None, float(1.0 / np.exp(scores.astype(np.float64) - scores[token]).sum())
        probs = sampling_probabilities(scores, options)
        token = int(state.rng.choice(probs.size, p=probs))
        return token, probs, float(probs[token])

"""Continuous batching: ``full_batch_size`` KV slots, requests joining and leaving while the others decode.

One scheduler thread owns the session. Each turn it admits waiting requests into free slots in submission order
(FIFO), prefills each admitted request alone (batch-1 runs over its slot's row of the shared KV buffers), then runs
one decode step of all slots in one batched call; a finished or cancelled request frees its slot at once. Requests
are submitted from any thread; ``submit`` returns a ``RequestHandle`` to iterate (``StreamEvent`` per token), wait
on (``result()``), ``await`` or ``cancel()``. A prompt that does not fit ``ctx_len`` is refused at ``submit``.

Speculative requests (``prompt_lookup_num_tokens``, ``assistant_model``) check their own proposer's guesses in the
same batched run: a decode step becomes a verification run of ``k + 1`` columns in which the other rows decode one
token (``qgraph.speculative``); each request takes as many tokens as it accepted.

A request's whole prompt is prefilled before the next decode step, not one chunk between decode steps: in a decode
step every slot that is not decoding is a padding row, and a padding row may write its (zero) K/V at a slot the batch
reaches (``group-query-attention`` places it at the batch's largest position), which would overwrite part of a
half-prefilled prompt. Free slots may take such writes: their next prompt rewrites every slot it reads.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass

import numpy as np

from qgraph.backend_api import DecoderSession
from qgraph.errors import QGraphError
from qgraph.request import FINISH_CANCELLED, Request, RequestTimes
from qgraph.runtime import PAD_POSITION, StepTimer, StreamEvent, prefill_rows, transient_run
from qgraph.speculative import (
    RequestProposers,
    check_speculation,
    guesses_asked,
    max_speculative_tokens,
    verify_step,
)
from qgraph.stats import LatencyStats

logger = logging.getLogger(__name__)


@dataclass
class Completion:
    """A finished request: its new tokens, text (ending before a stop string), why it ended, and its timings."""

    prompt_ids: list[int]
    generated_ids: list[int]
    text: str
    finish_reason: str
    times: RequestTimes
    stats: LatencyStats


class RequestHandle:
    """A submitted request: iterate it for ``StreamEvent``s (``for``, or ``async for`` over ``stream()``),
    ``result()`` to wait, ``await`` it, or ``cancel()``.

    Iteration hands out each event once (one consumer, sync or async); ``result()`` and ``await`` may be used as well
    or instead.
    """

    def __init__(self, request: Request, engine: Engine):
        self.request = request
        self._engine = engine
        self._events: queue.SimpleQueue[StreamEvent | BaseException] = queue.SimpleQueue()
        self._future: concurrent.futures.Future[Completion] = concurrent.futures.Future()
        self._wake: Callable[[], None] | None = None  # set by stream(): tells its event loop an event is queued
        self.cancel_requested = False

    def __iter__(self) -> Iterator[StreamEvent]:
        while True:
            event = self._events.get()
            if isinstance(event, BaseException):
                raise event
            yield event
            if event.finish_reason is not None:
                return

    async def stream(self) -> AsyncIterator[StreamEvent]:
        """The events in an event loop, without a thread per waiting consumer: the engine thread wakes the loop
        (``call_soon_threadsafe``) after each event it queues."""
        loop = asyncio.get_running_loop()
        queued = asyncio.Event()
        self._wake = lambda: loop.call_soon_threadsafe(queued.set)
        try:
            while True:
                try:
                    event = self._events.get_nowait()
                except queue.Empty:
                    await queued.wait()
                    queued.clear()
                    continue
                if isinstance(event, BaseException):
                    raise event
                yield event
                if event.finish_reason is not None:
                    return
        finally:
            self._wake = None

    def _put(self, event: StreamEvent | BaseException) -> None:
        self._events.put(event)
        wake = self._wake
        if wake is not None:
            try:
                wake()
            except RuntimeError:  # the consumer's loop is closed: nobody is listening any more
                pass

    def result(self, timeout: float | None = None) -> Completion:
        return self._future.result(timeout)

    def __await__(self):
        return asyncio.wrap_future(self._future).__await__()

    def cancel(self) -> None:
        """Stop the request (its slot is freed at the engine's next turn); it ends as ``"cancelled"``."""
        self._engine._cancel(self)

    @property
    def done(self) -> bool:
        return self._future.done()

    # -- called by the engine thread --

    def _token(self, tokens: list[int]) -> None:
        """The tokens one step took (one, or several from a speculative step)."""
        if not self.request.done:
            text = self.request.tracker.increment() if self.request.tracker else ""
            self._put(StreamEvent(text, tokens))

    def _finish(self, last_tokens: list[int], device_s: float) -> None:
        request = self.request
        text = request.tracker.increment(finished=True) if request.tracker else ""
        stats = request_latency(request, device_s)
        self._put(StreamEvent(text, last_tokens, request.finish_reason, stats))
        self._future.set_result(
            Completion(
                request.prompt_ids, list(request.generated), request.text, request.finish_reason, request.times, stats
            )
        )

    def _fail(self, error: BaseException) -> None:
        self._put(error)
        if not self._future.done():
            self._future.set_exception(error)


def request_latency(request: Request, device_s: float) -> LatencyStats:
    """One request's ``LatencyStats``: TTFT from its submission (queue included), its prefill and decode spans, and
    the device time attributed to it (its prefill runs, and an equal share of each decode step it was in)."""
    times = request.times
    first = times.first_token or times.finished or times.submitted
    finished = times.finished or first
    return LatencyStats(
        ttft_s=first - times.submitted,
        prefill_s=first - (times.admitted or times.submitted),
        decode_s=finished - first,
        e2e_s=finished - times.submitted,
        device_s=device_s,
        prompt_tokens=len(request.prompt_ids),
        generated_tokens=len(request.generated),
        decode_tokens=max(len(request.generated) - 1, 0),
        batch_size=1,
        proposed_tokens=request.speculation.proposed,
        accepted_tokens=request.speculation.accepted,
        verify_runs=request.speculation.verified_rows,
        verified_rows=request.speculation.verified_rows,
    )


@dataclass
class _Slot:
    handle: RequestHandle
    position: int  # where the next token goes
    device_s: float = 0.0


class Engine:
    """Continuous batching over a session with ``run_row`` (a batch-1 run of one row over the shared buffers)."""

    def __init__(self, session: DecoderSession, slots: int, pad_token_id: int = 0):
        if not hasattr(session, "run_row"):
            raise QGraphError(
                f"{type(session).__name__} cannot prefill one row of a batch (no run_row), so it cannot run "
                "continuous batching; compile without full_batch_size, or for a backend that supports it (ort)"
            )
        if slots < 1:
            raise QGraphError(f"full_batch_size must be >= 1, got {slots}")
        self.session = session
        self.slots = slots
        self.pad_token_id = pad_token_id
        self._condition = threading.Condition()
        self._waiting: deque[RequestHandle] = deque()
        self._active: dict[int, _Slot] = {}
        self._thread: threading.Thread | None = None
        self._closed = False
        # totals since the engine started (all requests), for aggregate stats
        self.prefill_s = 0.0
        self.decode_s = 0.0
        self.decode_steps = 0
        # speculative decoding: each request's own proposer (prompt lookup, a draft model), created on first use
        self._proposers: RequestProposers | None = None
        self.speculation = StepTimer()  # totals of guesses proposed / accepted since the engine started

    @property
    def ctx_len(self) -> int:
        return self.session.ctx_len

    def submit(self, request: Request) -> RequestHandle:
        """Queue a request (from any thread); it is admitted in submission order as slots free up."""
        asked = guesses_asked(request, max_speculative_tokens(self.session))
        if asked:
            check_speculation(self.session, asked, f"a request asking for {asked} guesses per step")
        handle = RequestHandle(request, self)
        with self._condition:
            if self._closed:
                raise QGraphError("the engine is closed; compile the model again to get a new one")
            request.times.submitted = time.perf_counter()
            self._waiting.append(handle)
            if self._thread is None:
                self.session.reset(self.slots)
                self._thread = threading.Thread(target=self._loop, name="qgraph-engine", daemon=True)
                self._thread.start()
            self._condition.notify()
        return handle

    def close(self) -> None:
        """Stop the scheduler thread once the requests in flight are done (waiting ones are cancelled)."""
        with self._condition:
            self._closed = True
            self._condition.notify()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def _cancel(self, handle: RequestHandle) -> None:
        with self._condition:
            handle.cancel_requested = True
            self._condition.notify()

    # -- the scheduler thread --

    def _loop(self) -> None:
        try:
            while True:
                admitted = self._admit()
                if admitted is None:
                    return
                for slot in admitted:
                    self._prefill(slot)
                if self._active:
                    self._decode_step()
        except BaseException as error:  # noqa: BLE001 - every waiting caller must hear of it
            logger.exception("continuous-batching engine stopped")
            with self._condition:
                handles = [s.handle for s in self._active.values()] + list(self._waiting)
                self._active.clear()
                self._waiting.clear()
                self._closed = True
            for handle in handles:
                handle._fail(error)

    def _admit(self) -> list[int] | None:
        """Drop cancelled requests, move waiting ones into free slots (FIFO); None when the engine should stop."""
        with self._condition:
            while True:
                for index, slot in list(self._active.items()):
                    if slot.handle.cancel_requested:
                        del self._active[index]
                        self._end(slot.handle, FINISH_CANCELLED, slot.device_s)
                for handle in [h for h in self._waiting if h.cancel_requested]:
                    self._waiting.remove(handle)
                    self._end(handle, FINISH_CANCELLED, 0.0)
                if self._waiting or self._active:
                    break
                if self._closed:
                    return None
                self._condition.wait()
            if self._closed:
                for handle in self._waiting:
                    self._end(handle, FINISH_CANCELLED, 0.0)
                self._waiting.clear()
            admitted = []
            free = [i for i in range(self.slots) if i not in self._active]
            now = time.perf_counter()
            while free and self._waiting:
                index, handle = free.pop(0), self._waiting.popleft()
                handle.request.times.admitted = now
                self._active[index] = _Slot(handle, len(handle.request.prompt_ids))
                admitted.append(index)
            return admitted

    def _end(self, handle: RequestHandle, reason: str, device_s: float) -> None:
        handle.request.finish(reason)
        handle._finish([], device_s)

    def _prefill(self, index: int) -> None:
        slot = self._active[index]
        request = slot.handle.request
        start, device = time.perf_counter(), self.session.device_seconds
        last = prefill_rows(
            self.session,
            [request.prompt_ids],
            self.pad_token_id,
            lambda ids, pos: self.session.run_row(index, ids, pos),
        )
        token = request.accept(last[0])
        if request.options.speculative and not request.done:
            if self._proposers is None:
                self._proposers = RequestProposers(self.slots, self.ctx_len)
            self._proposers.admit(index, request)
        elif self._proposers is not None:
            self._proposers.admit(index, request)  # the slot's previous proposer forgets it
        slot.device_s += self.session.device_seconds - device
        self.prefill_s += time.perf_counter() - start
        self._after_token(index, slot, [token])

    def _decode_step(self) -> None:
        if any(slot.handle.request.options.speculative for slot in self._active.values()):
            self._speculative_step()
            return
        start, device = time.perf_counter(), self.session.device_seconds
        ids = np.full((self.slots, 1), self.pad_token_id, dtype=np.int64)
        pos = np.full((self.slots, 1), PAD_POSITION, dtype=np.int64)
        for index, slot in self._active.items():
            ids[index, 0], pos[index, 0] = slot.handle.request.generated[-1], slot.position
        logits = transient_run(self.session)(ids, pos)  # read before the next run
        share = (self.session.device_seconds - device) / len(self._active)
        for index, slot in list(self._active.items()):
            slot.position += 1
            slot.device_s += share
            self._after_token(index, slot, [slot.handle.request.accept(logits[index, -1])])
        self.decode_s += time.perf_counter() - start
        self.decode_steps += 1

    def _speculative_step(self) -> None:
        """One verification run of all slots: each speculative request checks its own proposer's guesses (the others
        decode one token in the same run)."""
        start, device = time.perf_counter(), self.session.device_seconds
        live = [self._active[i].handle.request if i in self._active else None for i in range(self.slots)]
        compiled = max_speculative_tokens(self.session)
        ks = [guesses_asked(r, compiled) if r is not None else 0 for r in live]
        taken = verify_step(self.session, live, self._proposers, ks, self.pad_token_id, self.speculation)
        share = (self.session.device_seconds - device) / len(self._active)
        tokens: dict[int, list[int]] = {}
        for request, token in taken:
            tokens.setdefault(id(request), []).append(token)
        for index, slot in list(self._active.items()):
            mine = tokens.get(id(slot.handle.request), [])
            slot.position += len(mine)
            slot.device_s += share
            self._after_token(index, slot, mine)
        self.decode_s += time.perf_counter() - start
        self.decode_steps += 1

    def _after_token(self, index: int, slot: _Slot, tokens: list[int]) -> None:
        handle = slot.handle
        if handle.request.done:
            with self._condition:
                self._active.pop(index, None)
            handle._finish(tokens, slot.device_s)
        else:
            handle._token(tokens)

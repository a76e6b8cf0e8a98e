"""What the library shows a user who asked for it, in one place: progress of long steps with a heartbeat (``step``),
``qgraph: ...`` notes (``note``, on stderr, when ``verbose``), and the output ``generate`` prints as QEfficient's does
(``show``: completions, streamed text, statistics, on stdout). Everything else the library says goes through
``logging``; only the CLI and the demo print.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO


@contextmanager
def step(message: str, enabled: bool = True, heartbeat_s: float = 15.0, stream: TextIO | None = None) -> Iterator[None]:
    """Print ``message``, then elapsed time every ``heartbeat_s`` until the block ends, then the total."""
    out = stream or sys.stderr
    if not enabled:
        yield
        return
    start = time.perf_counter()
    _line(out, f"qgraph: {message} ...")
    done = threading.Event()

    def beat() -> None:
        while not done.wait(heartbeat_s):
            _line(out, f"qgraph:   ... {message}: {time.perf_counter() - start:.0f} s")

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
    _line(out, f"qgraph: {message}: done in {time.perf_counter() - start:.1f} s")


def note(message: str, enabled: bool = True, stream: TextIO | None = None) -> None:
    """One ``qgraph: message`` line on stderr (or ``stream``), for a user who asked for them (``enabled``)."""
    if enabled:
        _line(stream or sys.stderr, f"qgraph: {message}")


def show(text: str = "", end: str = "\n", stream: TextIO | None = None) -> None:
    """Output the user asked to see (generated text, statistics) on stdout (or ``stream``), flushed at once."""
    out = stream or sys.stdout
    out.write(text + end)
    out.flush()


def _line(stream: TextIO, text: str) -> None:
    stream.write(text + "\n")
    stream.flush()


class ProgressBar:
    """``qgraph: label  37/91 [########........] 12 s`` on stderr: redrawn in place on a terminal, a line every tenth
    of the way elsewhere (a log file gets ten lines, not thousands)."""

    WIDTH = 24

    def __init__(self, label: str, total: int, enabled: bool = True, stream: TextIO | None = None):
        self.label, self.total, self.enabled = label, max(total, 1), enabled
        self.stream = stream or sys.stderr
        self.done = 0
        self._start = time.perf_counter()
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._printed_tenth = -1

    def advance(self, n: int = 1) -> None:
        self.done = min(self.done + n, self.total)
        if not self.enabled:
            return
        tenth = self.done * 10 // self.total
        if self._tty:
            self.stream.write("\r" + self._text())
            if self.done == self.total:
                self.stream.write("\n")
            self.stream.flush()
        elif tenth > self._printed_tenth:
            self._printed_tenth = tenth
            _line(self.stream, self._text())

    def _text(self) -> str:
        filled = self.done * self.WIDTH // self.total
        bar = "#" * filled + "." * (self.WIDTH - filled)
        elapsed = time.perf_counter() - self._start
        return f"qgraph: {self.label} {self.done}/{self.total} [{bar}] {elapsed:.0f} s"

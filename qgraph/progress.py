"""Progress messages for long steps (export, compile), with a heartbeat so a long step never looks hung.

This is the library's reporter for a user who asked for progress (``verbose``): it writes ``qgraph: ...`` lines to
the stream it is given (stderr by default). Everything else the library says goes through ``logging``.
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


def _line(stream: TextIO, text: str) -> None:
    stream.write(text + "\n")
    stream.flush()

"""Hand-written graph matchers that say why they refused.

A matcher walks producers from a candidate node and either returns what it found or raises ``NoMatch`` with the
reason the candidate is not the form it looks for (``require(condition, reason)``). A pass collects the reasons of
the candidates it left alone and reports them (``CountedResult.misses``), so a user whose model was left unfused
learns why, not only a count.
"""

from __future__ import annotations

from typing import NoReturn, TypeVar

T = TypeVar("T")


class NoMatch(Exception):  # noqa: N818 (a refusal, not an error: it never leaves the pass)
    """A candidate is not the form a matcher looks for; ``str(exc)`` says why."""


def refuse(reason: str) -> NoReturn:
    raise NoMatch(reason)


def require(found: T | None, reason: str) -> T:
    """``found`` when it is truthy (a node, a value, a true condition), else a refusal with ``reason``."""
    if not found:
        raise NoMatch(reason)
    return found

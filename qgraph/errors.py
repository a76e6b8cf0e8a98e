"""Errors a user can act on.

Every failure that comes from the user's input (a model that is not there, a prompt that cannot fit, a graph a pass
cannot convert, a name nobody registered) is raised as a ``QGraphError`` whose message says what was wrong and what to
do. The CLI prints these without a traceback.
"""

from __future__ import annotations


class QGraphError(Exception):
    """Base class: a problem with the user's input or environment, explained in the message."""


class ModelNotFoundError(QGraphError):
    """The model name or path could not be resolved to weights."""


class PromptTooLongError(QGraphError):
    """A prompt does not fit in the compiled context length."""


class GraphPatternError(QGraphError):
    """A pass did not find the graph structure it rewrites; the message names what was missing."""


class UnknownNameError(QGraphError, KeyError):
    """A pass or backend name that is not registered."""

    def __init__(self, kind: str, name: str, known: list[str]):
        self.kind, self.name, self.known = kind, name, sorted(known)
        plural = f"{kind}es" if kind.endswith("s") else f"{kind}s"
        super().__init__(f"unknown {kind} {name!r}; known {plural}: {', '.join(self.known) or '(none)'}")

    def __str__(self) -> str:  # KeyError would quote the message otherwise
        return self.args[0]


class BackendUnavailableError(QGraphError):
    """The backend cannot run here (missing SDK or runtime); the message says how to finish elsewhere."""

"""What a verification run costs next to a one-token decode run, learned from the runs themselves.

Why: whether checking ``n`` guesses pays depends on how much a run of ``n + 1`` tokens per row costs more than a
plain decode step, and that depends on the machine, the backend, its threads (ORT's spinning threads make a one-token
run ~8% cheaper here) and the model: measured on SmolLM2 with ORT CPU, 8 guesses cost 1.31x a one-token run with
spinning off and 1.66x with it on (``benchmarks/results/spec-open-quiet.md``, ``spec-step-cost.md``). The speculative
loop times every run by its width; until a width has been seen, a linear prior stands in for it.
"""

from __future__ import annotations


class RunCosts:
    """Exponentially weighted mean seconds of a run by its width (tokens per row); ``relative(n)`` is a run checking
    ``n`` guesses over a one-token run."""

    def __init__(self, prior_per_guess: float = 0.08, weight: float = 0.1):
        if prior_per_guess < 0 or not 0 < weight <= 1:
            raise ValueError(f"need prior_per_guess >= 0 and 0 < weight <= 1, got {prior_per_guess}, {weight}")
        self.prior_per_guess = prior_per_guess
        self.weight = weight
        self._seconds: dict[int, float] = {}

    def observe(self, width: int, seconds: float) -> None:
        """A run of ``width`` tokens per row took ``seconds``."""
        if width < 1 or seconds <= 0:
            return
        mean = self._seconds.get(width)
        self._seconds[width] = seconds if mean is None else mean + self.weight * (seconds - mean)

    def relative(self, guesses: int) -> float:
        """Cost of a run checking ``guesses`` guesses (width ``guesses + 1``) over a one-token run; never below 1
        (more tokens never make a run cheaper, whatever the noise says)."""
        if guesses <= 0:
            return 1.0
        one, run = self._seconds.get(1), self._seconds.get(guesses + 1)
        if one is None or run is None:
            return self.prior(guesses)
        return max(1.0, run / one)

    def prior(self, guesses: int) -> float:
        """The prior's cost of a run checking ``guesses`` guesses: for choices that must not depend on timing (a
        seeded sampled request repeats only if its proposals do)."""
        return 1.0 + self.prior_per_guess * max(0, guesses)

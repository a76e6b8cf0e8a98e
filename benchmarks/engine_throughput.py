"""Throughput of continuous batching against one request at a time and static batches, on the same requests.

    python -m benchmarks.engine_throughput                      # SmolLM2-135M float32 and int4, ~20 min on 2 cores
    python -m benchmarks.engine_throughput --precisions float32 --repeats 1 --prompt-lens 16-96 --new-tokens 16-128

32 requests of mixed prompt lengths (default 16-64 tokens: 1-2 prefill chunks of 32) and mixed new-token counts
(default 16-240; EOS ignored, so every mode generates the same tokens) run three ways over ONE compiled ORT session
(the session is batch-agnostic; only the scheduling differs):

- ``one-at-a-time``: the static runtime with batch 1, request after request;
- ``static-8``: the static runtime in groups of 8 (a group waits for its longest request);
- ``engine-8``: the continuous-batching engine with 8 slots, all 32 submitted at once (FIFO admission).

Throughput = generated tokens / wall time of the whole set. Modes are interleaved within each repeat (contention on a
shared machine hits them alike) and the median over repeats is reported, with ratios. Greedy tokens of every request
are checked equal across the three modes. Writes ``benchmarks/results/engine_throughput.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

from qgraph.decoding import GenerationOptions
from qgraph.engine import Engine
from qgraph.request import Request
from qgraph.runtime import run_static

SMOLLM2 = Path("~/.cache/qgraph/weights/smollm2-135m-instruct-hf").expanduser()
TEXT_SOURCE = Path("/usr/share/common-licenses/GPL-3")  # English text to cut prompts from (Debian ships it)
RESULTS = Path(__file__).parent / "results"
N_REQUESTS, SLOTS, PREFILL = 32, 8, 32


def workload(tokenizer, prompt_lens: tuple[int, int], new_tokens: tuple[int, int], n: int = N_REQUESTS):
    """(prompt ids, new tokens) per request, both spread evenly over their ranges in a fixed scrambled order."""
    ids = tokenizer(TEXT_SOURCE.read_text())["input_ids"]
    out = []
    for i in range(n):
        length = prompt_lens[0] + (i * 37) % (prompt_lens[1] - prompt_lens[0] + 1)
        count = new_tokens[0] + (i * 53) % (new_tokens[1] - new_tokens[0] + 1)
        out.append((ids[i * 97 : i * 97 + length], count))
    return out


def _requests(work, ctx_len: int) -> list[Request]:
    return [
        Request(p, GenerationOptions(max_new_tokens=n, eos_token_ids=frozenset()), ctx_len, index=i)
        for i, (p, n) in enumerate(work)
    ]


def run_mode(mode: str, session, work) -> tuple[float, list[list[int]]]:
    """Wall seconds for the whole set, and every request's tokens."""
    requests = _requests(work, session.ctx_len)
    start = time.perf_counter()
    if mode == "one-at-a-time":
        run_static(session, requests, 1, 0, start)
    elif mode == "static-8":
        run_static(session, requests, SLOTS, 0, start)
    else:
        engine = Engine(session, SLOTS)
        handles = [engine.submit(r) for r in requests]
        for h in handles:
            h.result()
        engine.close()
    return time.perf_counter() - start, [r.generated for r in requests]


MODES = ("one-at-a-time", "static-8", "engine-8")


def bench_precision(precision: str, repeats: int, prompt_lens, new_tokens) -> dict:
    from transformers import AutoTokenizer

    from qgraph import QEFFAutoModelForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(SMOLLM2)
    model = QEFFAutoModelForCausalLM.from_pretrained(str(SMOLLM2), verbose=False)
    ctx_len = 64 * -(-(prompt_lens[1] + new_tokens[1]) // 64)
    model.compile(prefill_seq_len=PREFILL, ctx_len=ctx_len, precision=precision)
    session = model.artifact.load()
    work = workload(tokenizer, prompt_lens, new_tokens)
    tokens = sum(n for _, n in work)
    run_mode("engine-8", session, work[:8])  # warm-up: both batch shapes, both code paths
    run_mode("one-at-a-time", session, work[:1])
    seconds: dict[str, list[float]] = {m: [] for m in MODES}
    outputs: dict[str, list[list[int]]] = {}
    for r in range(repeats):
        for mode in MODES if r % 2 == 0 else reversed(MODES):
            wall, outputs[mode] = run_mode(mode, session, work)
            seconds[mode].append(wall)
            print(f"  {precision} repeat {r + 1}: {mode:<14} {wall:6.2f} s  {tokens / wall:7.1f} tok/s", flush=True)
    median = {m: statistics.median(s) for m, s in seconds.items()}
    return {
        "precision": precision,
        "ctx_len": ctx_len,
        "prompt_lens": list(prompt_lens),
        "new_tokens": list(new_tokens),
        "generated_tokens": tokens,
        "prompt_tokens": sum(len(p) for p, _ in work),
        "seconds": seconds,
        "tok_s": {m: tokens / median[m] for m in MODES},
        "engine_vs_one_at_a_time": median["one-at-a-time"] / median["engine-8"],
        "engine_vs_static_8": median["static-8"] / median["engine-8"],
        "tokens_identical": outputs["engine-8"] == outputs["one-at-a-time"] == outputs["static-8"],
    }


def markdown(results: list[dict], command: str, repeats: int) -> str:
    lines = [
        f"# Engine throughput ({time.strftime('%Y-%m-%d %H:%M')}, {platform.processor() or platform.machine()}, "
        f"2 cores shared with other work: contended)",
        "",
        f"`{command}`",
        "",
        f"SmolLM2-135M-Instruct, {N_REQUESTS} requests (prompts {results[0]['prompt_lens']} tokens, "
        f"{results[0]['new_tokens']} new tokens, EOS ignored), prefill_seq_len {PREFILL}, "
        f"ctx_len {results[0]['ctx_len']}, ORT CPU; median of {repeats} interleaved repeats.",
        "",
        "| precision | one-at-a-time tok/s | static batches of 8 tok/s | engine, 8 slots tok/s | engine / one | "
        "engine / static-8 | same tokens |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        t = r["tok_s"]
        lines.append(
            f"| {r['precision']} | {t['one-at-a-time']:.1f} | {t['static-8']:.1f} | {t['engine-8']:.1f} | "
            f"{r['engine_vs_one_at_a_time']:.2f}x | {r['engine_vs_static_8']:.2f}x | "
            f"{'yes' if r['tokens_identical'] else 'NO'} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precisions", default="float32,int4")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--prompt-lens", default="16-64", help="range of prompt lengths in tokens")
    parser.add_argument("--new-tokens", default="16-240", help="range of new-token counts")
    args = parser.parse_args()
    prompt_lens = tuple(int(x) for x in args.prompt_lens.split("-"))
    new_tokens = tuple(int(x) for x in args.new_tokens.split("-"))
    if not SMOLLM2.is_dir():
        raise SystemExit(f"{SMOLLM2} is missing: run `bash scripts/demo.sh` once to convert SmolLM2")
    results = [bench_precision(p, args.repeats, prompt_lens, new_tokens) for p in args.precisions.split(",")]
    command = (
        f"python -m benchmarks.engine_throughput --precisions {args.precisions} --repeats {args.repeats} "
        f"--prompt-lens {args.prompt_lens} --new-tokens {args.new_tokens}"
    )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "engine_throughput.json").write_text(json.dumps({"command": command, "results": results}, indent=2))
    text = markdown(results, command, args.repeats)
    (RESULTS / "engine_throughput.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()

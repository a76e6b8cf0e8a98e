"""What one decode run costs on the speculative compile next to the plain one, SmolLM2-135M batch 1, interleaved.

    python -m benchmarks.spec_step_cost --rounds 20 --block 16

Why: prompt lookup on text it cannot predict runs mostly 1-token steps on the model compiled with
``num_speculative_tokens``; if such a step costs more than a step of the plain compile, lookup loses on open-ended
text whatever it proposes. Compiles: ``plain`` (no speculation), ``spec`` (``num_speculative_tokens=k``), each with
ORT's default thread spinning, and ``spec-nospin`` (``allow_spinning`` off, as a draft model's target runs). Each
round runs a block of steps on each (rotating order) at the same position after the same prompt; medians and
quartiles in ms. Then the speculative compile at widths 1..k+1 (guesses 0..k), interleaved the same way.
Writes ``benchmarks/results/<name>.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
RESULTS = HERE / "results"
PREFILL, CTX = 64, 256


def compiled(model_dir: Path, threads: int, **options):
    from qgraph import QEFFAutoModelForCausalLM

    model = QEFFAutoModelForCausalLM.from_pretrained(str(model_dir), verbose=False)
    session_options = {"intra_op_num_threads": threads, **options.pop("session_options", {})}
    model.compile(prefill_seq_len=PREFILL, ctx_len=CTX, session_options=session_options, **options)
    return model


def primed(model, prompt: list[int]):
    from qgraph.runtime import prefill_rows

    session = model._loaded_session()
    session.reset(1)
    prefill_rows(session, [prompt], 0)
    return session


def step_ms(session, token: int, start: int, width: int) -> float:
    ids = np.full((1, width), token, dtype=np.int64)
    pos = np.arange(start, start + width, dtype=np.int64)[None]
    t0 = time.perf_counter()
    session.run(ids, pos)
    return 1000 * (time.perf_counter() - t0)


def interleaved(runs: dict[str, callable], rounds: int, block: int) -> dict[str, dict[str, float]]:
    """Per run: the median over rounds of the median step of a block of ``block`` consecutive steps (the first 2 of a
    block dropped: another session's threads may still be spinning down). Blocks, not single steps, interleave:
    a generation runs its steps back to back on one session."""
    names = list(runs)
    blocks: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds + 1):  # one warm-up round
        shift = r % len(names)
        for n in names[shift:] + names[:shift]:
            steps = [runs[n]() for _ in range(block + 2)][2:]
            if r:
                blocks[n].append(statistics.median(steps))
    out = {}
    for n, t in blocks.items():
        q = statistics.quantiles(t, n=4)
        out[n] = {"median": statistics.median(t), "q1": q[0], "q3": q[2], "rounds": len(t)}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--block", type=int, default=16)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--name", default="spec-step-cost")
    args = parser.parse_args(argv)
    command = "python -m benchmarks.spec_step_cost " + " ".join(argv if argv is not None else sys.argv[1:])
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    from benchmarks.models import smollm2_dir
    from benchmarks.speculative_prompts import OPEN_ENDED
    from qgraph.prompts import prompt_token_ids

    model_dir = smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompt = prompt_token_ids(tokenizer, messages=[{"role": "user", "content": OPEN_ENDED[0]}])[1][0]
    models = {
        "plain": compiled(model_dir, args.threads),
        "spec": compiled(model_dir, args.threads, num_speculative_tokens=args.k),
        "spec-nospin": compiled(
            model_dir, args.threads, num_speculative_tokens=args.k, session_options={"allow_spinning": False}
        ),
    }
    load_start = os.getloadavg()
    sessions = {n: primed(m, prompt) for n, m in models.items()}
    start = len(prompt)
    token = prompt[-1]
    one = interleaved(
        {n: (lambda s=s: step_ms(s, token, start, 1)) for n, s in sessions.items()}, args.rounds, args.block
    )
    spec = sessions["spec"]
    widths = list(range(1, args.k + 2))
    by_width = interleaved(
        {str(w): (lambda w=w: step_ms(spec, token, start, w)) for w in widths}, args.rounds, args.block
    )
    data = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": command,
        "threads": args.threads,
        "k": args.k,
        "load_start": load_start,
        "load_end": os.getloadavg(),
        "one_token_ms": one,
        "speculative_by_width_ms": by_width,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(data, indent=1))
    base = one["plain"]["median"]
    lines = [
        f"# One decode run: speculative vs plain compile, SmolLM2-135M float32 batch 1 ({data['date']})",
        "",
        f"`{command}`",
        "",
        f"{args.threads} ORT threads, ctx_len {CTX}, position {start}; load average (1/5/15 min) "
        f"{' / '.join(f'{x:.2f}' for x in load_start)} at start, {' / '.join(f'{x:.2f}' for x in data['load_end'])} "
        f"at end. {args.rounds} rounds after a warm-up round; each round runs a block of {args.block} + 2 steps on "
        "every compile in rotating order; the median step of each block (its first 2 dropped), then the median "
        "(q1, q3) over rounds.",
        "",
        "| compile | 1-token run ms (median) | q1 | q3 | vs plain |",
        "|---|---|---|---|---|",
    ]
    for n, s in one.items():
        lines.append(f"| {n} | {s['median']:.2f} | {s['q1']:.2f} | {s['q3']:.2f} | {s['median'] / base:.3f}x |")
    w1 = by_width["1"]["median"]
    lines += [
        "",
        "Speculative compile (spinning on) by tokens per run (blocks interleaved the same way):",
        "",
        "| tokens per run | " + " | ".join(by_width) + " |",
        "|---" * (len(by_width) + 1) + "|",
        "| ms | " + " | ".join(f"{s['median']:.2f}" for s in by_width.values()) + " |",
        "| vs 1 token | " + " | ".join(f"{s['median'] / w1:.3f}" for s in by_width.values()) + " |",
        "",
    ]
    text = "\n".join(lines)
    (RESULTS / f"{args.name}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

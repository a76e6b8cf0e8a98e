"""Host overhead of a decode step: qgraph's whole runtime step against ONNX Runtime's ``session.run`` inside it, and
onnxruntime-genai's int4 ``session.run`` in the same run.

    python -m benchmarks.step_overhead [--rounds 7] [--steps 48] [--batches 1,8] [--configs default] [--out PATH]

SmolLM2-135M-Instruct (real weights), int4, 16-token prompts, ``--threads`` intra-op threads (2). qgraph's artifact
(``compile(precision="int4", batch_size=b)``, static batch) is driven by its own greedy loop
(``qgraph.runtime.greedy_generate`` over ``OrtDecoderSession``); its ``session.run_with_iobinding`` is timed inside
the loop, and the whole step is the time between the last token of one step and the last token of the next (what a
user's ``on_token`` callback sees). Their difference, step by step, is the host work the loop adds around the run
(binding inputs, reading logits, choosing tokens, stop checks, stats). genai's int4 ``model.onnx`` (its own builder,
``benchmarks.int4_vs_genai.genai_model``) is stepped by a plain ORT loop the way its runtime feeds it (one KV buffer
per layer bound as past and present, the attention mask growing a column a step); its ``session.run`` is the bar a
host loop adding nothing would reach. Each round runs one generation of ``--steps`` decode steps per variant and
batch, the order rotating, after one warm-up round; reported are medians over all decode steps of all rounds, and
the median over rounds of each round's ratio to genai's run. Writes ``benchmarks/results/step_overhead.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks.int4_profile import genai_plain_loop, time_session_runs
from benchmarks.int4_vs_genai import CTX_LEN, genai_model
from benchmarks.models import smollm2_dir
from benchmarks.report import RESULTS_DIR, run_header, run_record, write_results
from benchmarks.workload import prompt_rows

PROMPT_LEN = 16
GENAI = "genai"
# per step, milliseconds: what each variant reports
Steps = dict[str, list[float]]


def qgraph_runner(
    model_dir: Path, quantization: dict, batch: int, threads: int, steps: int
) -> Callable[[list[list[int]]], Steps]:
    """One greedy generation over the compiled int4 artifact per call: per decode step its run and whole-step ms."""
    from qgraph.api import QEFFAutoModelForCausalLM
    from qgraph.backends.ort import OrtDecoderSession
    from qgraph.runtime import greedy_generate

    model = QEFFAutoModelForCausalLM.from_pretrained(
        str(model_dir), cache_dir=Path.home() / ".cache" / "qgraph", verbose=False
    )
    model.compile(
        prefill_seq_len=PROMPT_LEN,
        ctx_len=CTX_LEN,
        batch_size=batch,
        precision="int4",
        quantization=quantization or None,
    )
    saved = json.loads((model.artifact.directory / "ort_settings.json").read_text())
    session = OrtDecoderSession(
        model.artifact.onnx_path,
        saved["session_options"] | {"intra_op_num_threads": threads},
        saved["providers"],
        PROMPT_LEN,
        saved.get("graph"),
    )
    runs = time_session_runs(session)

    def run(rows: list[list[int]]) -> Steps:
        runs.clear()
        marks: list[float] = []
        greedy_generate(
            session, rows, len(rows), steps + 1, set(), on_token=lambda i, t: marks.append(time.perf_counter())
        )
        ends = marks[len(rows) - 1 :: len(rows)]  # the last token of each step (prefill's first, then one per run)
        whole = [b - a for a, b in zip(ends, ends[1:], strict=False)]
        decode_runs = runs[len(runs) - len(whole) :]  # the prompt fits one prefill run
        return {
            "run_ms": [1000 * r for r in decode_runs],
            "step_ms": [1000 * w for w in whole],
            "overhead_ms": [1000 * (w - r) for w, r in zip(whole, decode_runs, strict=True)],
        }

    return run


def genai_runner(model_dir: Path, threads: int, steps: int) -> Callable[[list[list[int]]], Steps]:
    """genai's int4 ``model.onnx`` in a plain ORT loop fed as its runtime feeds it; per decode step its run ms."""
    import onnxruntime as ort

    path = genai_model(model_dir, threads)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path / "model.onnx"), options, providers=["CPUExecutionProvider"])

    def run(rows: list[list[int]]) -> Steps:
        return {"run_ms": [1000 * r for r in genai_plain_loop(session, path, rows, steps)[1:]]}

    return run


def measure(variants: dict[str, dict[int, Callable]], prompts: dict[int, list[list[int]]], rounds: int) -> dict:
    """``rounds`` + 1 rounds (the first is warm-up), the variants' order rotating; per batch and variant the
    per-step lists of every kept round."""
    names = list(variants)
    out: dict = {str(b): {n: [] for n in names} for b in prompts}
    for r in range(rounds + 1):
        order = names[r % len(names) :] + names[: r % len(names)]
        for batch, rows in prompts.items():
            for name in order:
                steps = variants[name][batch](rows)
                if r:
                    out[str(batch)][name].append(steps)
    return out


def summarize(runs: dict) -> dict:
    """Per batch and variant: medians over all steps; per qgraph variant, also the median over rounds of the
    round's step / genai run and run / genai run."""
    summary: dict = {}
    for batch, by_variant in runs.items():
        genai = [statistics.median(x["run_ms"]) for x in by_variant[GENAI]]
        summary[batch] = {}
        for name, rounds in by_variant.items():
            item = {m: statistics.median(v for x in rounds for v in x[m]) for m in rounds[0]}
            if name != GENAI:
                item["step_vs_genai_run"] = statistics.median(
                    statistics.median(x["step_ms"]) / g for x, g in zip(rounds, genai, strict=True)
                )
                item["run_vs_genai_run"] = statistics.median(
                    statistics.median(x["run_ms"]) / g for x, g in zip(rounds, genai, strict=True)
                )
            summary[batch][name] = item
    return summary


def markdown(result: dict) -> str:
    lines = [
        "# Host overhead per decode step: qgraph's runtime step vs its session.run, genai's session.run beside",
        "",
        f"Command: `{result['command']}`  ",
        run_header(result) + f"; qgraph commit {result['qgraph_commit']}  ",
        f"SmolLM2-135M-Instruct int4, {PROMPT_LEN}-token prompts, ctx_len {CTX_LEN}, {result['threads']} intra-op "
        f"threads, {result['steps']} decode steps per generation, 1 warm-up + {result['rounds']} rounds, order "
        "rotating. Medians over all decode steps; 'x genai run' = median over rounds of the round's median / genai's "
        "run in the same round. Overhead = whole step − session.run, step by step.",
        "",
        "| batch | variant | session.run ms | whole step ms | overhead ms | overhead % of step | run x genai run "
        "| step x genai run |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for batch, by_variant in result["summary"].items():
        for name, s in by_variant.items():
            if name == GENAI:
                lines.append(f"| {batch} | genai int4 (plain ORT loop) | {s['run_ms']:.3f} | – | – | – | 1 | – |")
                continue
            lines.append(
                f"| {batch} | {name} | {s['run_ms']:.3f} | {s['step_ms']:.3f} | {s['overhead_ms']:.3f} | "
                f"{100 * s['overhead_ms'] / s['step_ms']:.1f} | {s['run_vs_genai_run']:.3f} | "
                f"{s['step_vs_genai_run']:.3f} |"
            )
    return "\n".join(lines) + "\n"


def _commit() -> str:
    """The qgraph commit measured (before/after comparisons name it)."""
    here = Path(__file__).parent
    done = subprocess.run(["git", "-C", str(here), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip() or "unknown"


def main(argv: list[str] | None = None) -> int:
    from benchmarks.quant_sweep import CONFIGS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", default="1,8", help="comma-separated batch sizes (static batches)")
    parser.add_argument(
        "--configs", default="default", help=f"qgraph int4 variants, comma-separated: {', '.join(CONFIGS['int4'])}"
    )
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "step_overhead")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model_dir = smollm2_dir()
    batches = [int(b) for b in args.batches.split(",")]
    prompts = {b: prompt_rows(model_dir, b, PROMPT_LEN) for b in batches}
    load_start = os.getloadavg()
    variants: dict[str, dict[int, Callable]] = {}
    for config in args.configs.split(","):
        variants[f"qgraph int4 ({config})"] = {
            b: qgraph_runner(model_dir, CONFIGS["int4"][config], b, args.threads, args.steps) for b in batches
        }
    variants[GENAI] = {b: genai_runner(model_dir, args.threads, args.steps) for b in batches}
    runs = measure(variants, prompts, args.rounds)
    result = {
        **run_record("benchmarks.step_overhead", argv, load_start),
        "qgraph_commit": _commit(),
        "rounds": args.rounds,
        "steps": args.steps,
        "threads": args.threads,
        "summary": summarize(runs),
        "runs": runs,
    }
    write_results(args.out, result, markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

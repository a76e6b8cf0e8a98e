"""Where a decode step's time goes: qgraph's int4 artifact against onnxruntime-genai's int4 model, op by op.

    python -m benchmarks.int4_profile [--prompt-len 16] [--batch 1] [--steps 24] [--configs default,asym-head4]

Both graphs run under ONNX Runtime's profiler (``SessionOptions.enable_profiling``) with one intra-op thread, so a
kernel's time is its whole cost. qgraph's artifact is driven by qgraph's own greedy loop (``greedy_generate``) over
its ``OrtDecoderSession``; genai's ``model.onnx`` (made by its own builder, ``benchmarks.int4_vs_genai.genai_model``)
by a plain ORT loop in the form its runtime feeds it (prompt in one run, then one token a step; one KV buffer per
layer bound as both past and present, the attention mask growing by one column a step). Per decode step: the time of
each op type (summed over its nodes), the node count, ``session.run``'s own time (the profiler's ``model_run``) and,
for qgraph, the whole step of the runtime loop timed separately without the profiler (so the loop's cost around
``session.run`` shows as their difference). Prints a markdown table; writes nothing else (profiles go to a
temporary directory).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from benchmarks.int4_vs_genai import CTX_LEN, genai_model
from benchmarks.models import smollm2_dir
from benchmarks.workload import prompt_rows

CACHE_DIR = Path.home() / ".cache" / "qgraph"


def time_session_runs(session, clock: Callable[[], float] = time.perf_counter) -> list[float]:
    """Every later ``run_with_iobinding`` of a qgraph ``OrtDecoderSession``'s ORT session, timed by ``clock``: the
    list the durations (seconds) are appended to."""
    runs: list[float] = []
    inner = session.session.run_with_iobinding

    def timed(binding, *args):
        start = clock()
        inner(binding, *args)
        runs.append(clock() - start)

    session.session.run_with_iobinding = timed
    return runs


def genai_plain_loop(
    session, path: Path, rows: list[list[int]], steps: int, clock: Callable[[], float] = time.perf_counter
) -> list[float]:
    """One greedy generation of genai's ``model.onnx`` (in ``path``) by a plain ORT loop fed the way its runtime feeds
    it: the prompt in one run, then one token a step; one KV buffer per layer bound as both past and present, the
    attention mask growing by one column a step. Returns each run's duration by ``clock`` (the prompt's first)."""
    import onnxruntime as ort

    config = json.loads((path / "genai_config.json").read_text())["model"]["decoder"]
    layers, kv_heads, head = config["num_hidden_layers"], config["num_key_value_heads"], config["head_size"]
    batch, prompt = len(rows), len(rows[0])
    buffers = [
        ort.OrtValue.ortvalue_from_numpy(np.zeros((batch, kv_heads, prompt + steps + 1, head), np.float32))
        for _ in range(2 * layers)
    ]
    binding = session.io_binding()
    binding.bind_output("logits", "cpu")  # first: get_outputs()[0] (rebinding keeps the slot)
    for i in range(layers):
        for j, kind in enumerate(("key", "value")):
            binding.bind_ortvalue_input(f"past_key_values.{i}.{kind}", buffers[2 * i + j])
            binding.bind_ortvalue_output(f"present.{i}.{kind}", buffers[2 * i + j])
    ids = np.array(rows, np.int64)
    runs = []
    for total in range(prompt, prompt + steps + 1):
        binding.bind_cpu_input("input_ids", ids)
        binding.bind_cpu_input("attention_mask", np.ones((batch, total), np.int64))
        binding.bind_output("logits", "cpu")  # its shape changes after the prompt
        start = clock()
        session.run_with_iobinding(binding)
        runs.append(clock() - start)
        ids = binding.get_outputs()[0].numpy()[:, -1].argmax(-1).astype(np.int64)[:, None]
    return runs


def _step_profile(profile: Path, skip_runs: int) -> dict:
    """Per-run op-type totals (ms) and model_run time (ms) of an ORT profile, the first ``skip_runs`` runs left out."""
    events = json.loads(profile.read_text())
    runs = sorted((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])
    kept = runs[skip_runs:]
    per_op: dict[str, list[float]] = collections.defaultdict(lambda: [0.0] * len(kept))
    nodes: dict[str, set[str]] = collections.defaultdict(set)
    for event in events:
        if event.get("cat") != "Node" or not event["name"].endswith("_kernel_time"):
            continue
        for index, run in enumerate(kept):
            if run["ts"] <= event["ts"] <= run["ts"] + run["dur"]:
                op = event["args"].get("op_name", "?")
                per_op[op][index] += event["dur"] / 1000
                nodes[op].add(event["name"])
                break
    return {
        "model_run_ms": statistics.median(r["dur"] / 1000 for r in kept),
        "ops": {op: (statistics.median(times), len(nodes[op])) for op, times in per_op.items()},
    }


@contextlib.contextmanager
def _profiled_sessions(prefix: Path):
    """qgraph's ORT sessions created inside get ``enable_profiling`` (the artifact's own options otherwise)."""
    import qgraph.backends.ort as ort_backend

    original = ort_backend._session_options

    def profiled(settings):
        options = original(settings)
        options.enable_profiling = True
        options.profile_file_prefix = str(prefix)
        return options

    ort_backend._session_options = profiled
    try:
        yield
    finally:
        ort_backend._session_options = original


def qgraph_session(model_dir: Path, quantization: dict, rows: list[list[int]], profile_prefix: Path | None):
    """The int4 artifact compiled like ``benchmarks.int4_vs_genai``, loaded with one intra-op thread."""
    from qgraph.api import QEFFAutoModelForCausalLM
    from qgraph.backends.ort import OrtDecoderSession

    model = QEFFAutoModelForCausalLM.from_pretrained(str(model_dir), cache_dir=CACHE_DIR, verbose=False)
    model.compile(
        prefill_seq_len=len(rows[0]),
        ctx_len=CTX_LEN,
        batch_size=len(rows),
        precision="int4",
        quantization=quantization or None,
    )
    saved = json.loads((model.artifact.directory / "ort_settings.json").read_text())
    settings = saved["session_options"] | {"intra_op_num_threads": 1}
    context = _profiled_sessions(profile_prefix) if profile_prefix else contextlib.nullcontext()
    with context:
        return OrtDecoderSession(
            model.artifact.onnx_path, settings, saved["providers"], len(rows[0]), saved.get("graph")
        ), model.artifact.onnx_path


def qgraph_profile(model_dir: Path, quantization: dict, rows: list[list[int]], steps: int, tmp: Path) -> dict:
    from qgraph.runtime import greedy_generate

    session, onnx_path = qgraph_session(model_dir, quantization, rows, tmp / "qgraph")
    greedy_generate(session, rows, len(rows), steps + 1, set())
    profile = Path(session.session.end_profiling())
    result = _step_profile(profile, skip_runs=1)
    result["graph_nodes"] = _node_counts(onnx_path)
    # the runtime loop's whole step, timed without the profiler: thread CPU time of a decode step vs session.run's
    plain, _ = qgraph_session(model_dir, quantization, rows, None)
    run_cpu = time_session_runs(plain, time.thread_time)
    steps_cpu = []
    for _ in range(3):
        run_cpu.clear()
        marks: list[float] = []
        greedy_generate(
            plain, rows, len(rows), steps + 1, set(), on_token=lambda i, t, m=marks: m.append(time.thread_time())
        )
        per_token = len(rows)
        firsts = marks[per_token - 1 :: per_token]  # the last token of each step
        steps_cpu.append(((firsts[-1] - firsts[0]) / (len(firsts) - 1), statistics.median(run_cpu[1:])))
    result["step_cpu_ms"] = 1000 * statistics.median(s for s, _ in steps_cpu)
    result["run_cpu_ms"] = 1000 * statistics.median(r for _, r in steps_cpu)
    return result


def genai_profile(model_dir: Path, rows: list[list[int]], steps: int, tmp: Path) -> dict:
    """genai's int4 ``model.onnx`` stepped by a plain ORT loop the way its runtime feeds it; then, without the
    profiler, that loop's ``session.run`` CPU time and genai's own runtime's whole step (``og.Generator``)."""
    import onnx
    import onnxruntime as ort

    path = genai_model(model_dir, 1)

    def session_for(profile: bool) -> ort.InferenceSession:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.enable_profiling = profile
        options.profile_file_prefix = str(tmp / "genai")
        return ort.InferenceSession(str(path / "model.onnx"), options, providers=["CPUExecutionProvider"])

    session = session_for(profile=True)
    genai_plain_loop(session, path, rows, steps)
    result = _step_profile(Path(session.end_profiling()), skip_runs=1)
    result["graph_nodes"] = _node_counts(path / "model.onnx", onnx)
    timings = [
        statistics.median(genai_plain_loop(session_for(profile=False), path, rows, steps, time.thread_time)[1:])
        for _ in range(3)
    ]
    result["run_cpu_ms"] = 1000 * statistics.median(timings)
    result["step_cpu_ms"] = _genai_runtime_step_cpu(path, rows, steps)
    return result


def _genai_runtime_step_cpu(path: Path, rows: list[list[int]], steps: int) -> float:
    """genai's own runtime (og.Generator, one intra-op thread): thread CPU ms per decode step, median of 3."""
    import onnxruntime_genai as og

    model = og.Model(str(path))
    per_step = []
    for _ in range(3):
        ids = np.array(rows, dtype=np.int32)
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=ids.shape[1] + steps + 1, do_sample=False, batch_size=ids.shape[0])
        generator = og.Generator(model, params)
        generator.append_tokens(ids)
        generator.generate_next_token()
        start = time.thread_time()
        for _ in range(steps):
            generator.generate_next_token()
        per_step.append((time.thread_time() - start) / steps)
    return 1000 * statistics.median(per_step)


def _node_counts(path: Path, onnx=None) -> dict[str, int]:
    if onnx is None:
        import onnx
    graph = onnx.load(str(path), load_external_data=False).graph
    return dict(collections.Counter(n.op_type for n in graph.node))


def markdown(results: dict[str, dict], title: str) -> str:
    names = list(results)
    ops = sorted(
        {op for r in results.values() for op in r["ops"]},
        key=lambda op: -max(r["ops"].get(op, (0, 0))[0] for r in results.values()),
    )
    lines = [title, "", "| op type | " + " | ".join(f"{n} ms/step (nodes)" for n in names) + " |"]
    lines.append("|---|" + "---|" * len(names))
    for op in ops:
        cells = []
        for n in names:
            ms, count = results[n]["ops"].get(op, (0.0, 0))
            cells.append(f"{ms:.3f} ({count})" if count else "-")
        lines.append(f"| {op} | " + " | ".join(cells) + " |")
    lines.append(
        "| **sum of kernels** | "
        + " | ".join(f"**{sum(ms for ms, _ in results[n]['ops'].values()):.3f}**" for n in names)
        + " |"
    )
    lines.append(
        "| session.run (profiler's model_run) | "
        + " | ".join(f"{results[n]['model_run_ms']:.3f}" for n in names)
        + " |"
    )
    lines.append(
        "| session.run CPU, no profiler | "
        + " | ".join(f"{results[n]['run_cpu_ms']:.3f}" if "run_cpu_ms" in results[n] else "-" for n in names)
        + " |"
    )
    lines.append(
        "| whole runtime step CPU, no profiler | "
        + " | ".join(f"{results[n]['step_cpu_ms']:.3f}" if "step_cpu_ms" in results[n] else "-" for n in names)
        + " |"
    )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from benchmarks.quant_sweep import CONFIGS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=24, help="decode steps profiled (after the prefill)")
    parser.add_argument("--configs", default="default", help=f"qgraph int4 variants: {', '.join(CONFIGS['int4'])}")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--append-md", type=Path, help="append the table (with the command and date) to this file")
    parser.add_argument("--profiles", type=Path, help="keep ONNX Runtime's profile files in this directory")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    load_start = os.getloadavg()[0]
    model_dir = smollm2_dir()
    rows = prompt_rows(model_dir, args.batch, args.prompt_len)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        if args.profiles:
            args.profiles.mkdir(parents=True, exist_ok=True)
            tmp = str(args.profiles)
        for config in args.configs.split(","):
            results[f"qgraph {config}"] = qgraph_profile(
                model_dir, CONFIGS["int4"][config], rows, args.steps, Path(tmp)
            )
        results["genai int4"] = genai_profile(model_dir, rows, args.steps, Path(tmp))
    command = " ".join(argv if argv is not None else sys.argv[1:])
    title = (
        f"## Decode step at batch {args.batch}, {args.prompt_len}-token prompt, 1 intra-op thread, median over "
        f"{args.steps} steps\n\n`python -m benchmarks.int4_profile {command}`"
        f" ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load average {load_start:.1f} at start, "
        f"{os.getloadavg()[0]:.1f} at end)"
    )
    text = (
        markdown(results, title)
        + "\n"
        + "".join(
            f"- {name} graph nodes: "
            + ", ".join(f"{op} {n}" for op, n in sorted(result["graph_nodes"].items(), key=lambda kv: -kv[1]))
            + "\n"
            for name, result in results.items()
        )
    )
    print(text)
    if args.append_md:
        with args.append_md.open("a") as out:
            out.write(text + "\n")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

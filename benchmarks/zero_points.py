"""What MatMulNBits costs per way of executing a block's zero point, on SmolLM2's matrix shapes.

Why: asymmetric 4-bit blocks with a float zero point (``w = scale * q + min``, llama.cpp's Q4_1) keep weights that
are on such a grid exactly, where ONNX Runtime's integer zero point moves each block by up to half a step. ONNX
Runtime's CPU kernel does not pre-pack a float zero point, so ``quantize-weights`` also offers it split into the
integer part plus a correction row per block (``float_zero_points="split"``). This measures the three against each
other: a chain of ``--pairs`` up/down projections (K=576 -> N=1536 -> 576, SmolLM2's MLP shapes, no activation in
between) quantized each way, one intra-op thread, the CPU time of the calling thread per run (ONNX Runtime then runs
every kernel on it), at M=1 and M=8 rows; variants interleaved round by round, medians and per-round ratios to the
integer zero points.

    python -m benchmarks.zero_points [--pairs 10] [--rounds 7] [--runs 200]

Writes ``benchmarks/results/zero_points.{json,md}``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir

from benchmarks.report import RESULTS_DIR, run_header, run_record, write_results
from qgraph.graph_utils import initializer_value
from qgraph.passes.quantize_weights import QuantizeWeights

HIDDEN, INTERMEDIATE = 576, 1536
VARIANTS = {
    "integer zero points (rtn)": {"algorithm": "rtn"},
    "float zero points, split (minmax)": {"algorithm": "minmax", "float_zero_points": "split"},
    "float zero points, input (minmax)": {"algorithm": "minmax", "float_zero_points": "input"},
}
ROWS = (1, 8)


def chain(pairs: int, seed: int = 0) -> ir.Model:
    """``x [M, 1, 576]`` through ``pairs`` x (MatMul 576x1536, MatMul 1536x576), float32 Gaussian weights."""
    rng = np.random.default_rng(seed)
    x = ir.Value(name="x", shape=ir.Shape(["M", 1, HIDDEN]), type=ir.TensorType(ir.DataType.FLOAT))
    value, nodes, weights = x, [], []
    for i in range(2 * pairs):
        k, n = (HIDDEN, INTERMEDIATE) if i % 2 == 0 else (INTERMEDIATE, HIDDEN)
        w = initializer_value(f"w{i}", (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32))
        weights.append(w)
        node = ir.node("MatMul", [value, w], name=f"matmul{i}")
        value = node.outputs[0]
        value.name, value.type = f"y{i}", ir.TensorType(ir.DataType.FLOAT)
        value.shape = ir.Shape(["M", 1, n])
        nodes.append(node)
    graph = ir.Graph([x], [value], nodes=nodes, initializers=weights, opset_imports={"": 20})
    return ir.Model(graph, ir_version=10)


def session(options: dict, directory: Path, pairs: int):
    import onnxruntime as ort

    model = chain(pairs)
    counts = QuantizeWeights(bits=4, accuracy_level=4, min_elements=0, **options)(model).counts
    counts["nodes"] = len(model.graph)
    path = directory / f"chain-{len(list(directory.iterdir()))}.onnx"
    ir.save(model, path)
    settings = ort.SessionOptions()
    settings.intra_op_num_threads = 1
    settings.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), settings, providers=["CPUExecutionProvider"]), counts


def cpu_us_per_run(sess, x: np.ndarray, runs: int) -> float:
    start = time.thread_time()
    for _ in range(runs):
        sess.run(None, {"x": x})
    return 1e6 * (time.thread_time() - start) / runs


def markdown(result: dict) -> str:
    lines = [
        "# MatMulNBits 4-bit: integer, split and float zero points (CPU time per run, one thread)",
        "",
        f"Command: `{result['command']}`  ",
        run_header(result) + ".  ",
        f"A chain of {result['pairs']} x (576 -> 1536 -> 576) MatMulNBits (blocks of 32, `accuracy_level` 4), input "
        f"[M, 1, 576]; {result['runs']} runs per measurement, {result['rounds']} rounds after a warm-up, variants "
        "interleaved; median CPU µs per run of the calling thread, per MatMul, and the median per-round ratio to "
        "the integer zero points.",
        "",
        "| variant | nodes | " + " | ".join(f"M={m} µs/run (per MatMul), ratio" for m in result["rows"]) + " |",
        "|---|---|" + "---|" * len(result["rows"]),
    ]
    first = next(iter(result["variants"]))
    for name, row in result["variants"].items():
        cells = []
        for m in result["rows"]:
            runs = row["runs"][str(m)]
            ratios = [a / b for a, b in zip(runs, result["variants"][first]["runs"][str(m)], strict=True)]
            median = statistics.median(runs)
            cells.append(f"{median:.0f} ({median / (2 * result['pairs']):.1f}), {statistics.median(ratios):.2f}x")
        lines.append(f"| {name} | {row['nodes']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "zero_points")
    args = parser.parse_args(argv)
    load_start = os.getloadavg()
    rng = np.random.default_rng(1)
    inputs = {m: rng.standard_normal((m, 1, HIDDEN)).astype(np.float32) for m in ROWS}
    with tempfile.TemporaryDirectory() as tmp:
        sessions, result_variants = {}, {}
        for name, options in VARIANTS.items():
            sessions[name], counts = session(options, Path(tmp), args.pairs)
            result_variants[name] = {"options": options, "counts": counts, "runs": {str(m): [] for m in ROWS}}
            result_variants[name]["nodes"] = counts["nodes"]
        names = list(VARIANTS)
        for round_index in range(args.rounds + 1):
            order = names[round_index % len(names) :] + names[: round_index % len(names)]
            for m in ROWS:
                for name in order:
                    runs = args.runs if "input" not in name else max(1, args.runs // 10)  # the slow path: fewer
                    value = cpu_us_per_run(sessions[name], inputs[m], runs)
                    if round_index:
                        result_variants[name]["runs"][str(m)].append(value)
            print(f"round {round_index}/{args.rounds} (load {os.getloadavg()[0]:.1f})", file=sys.stderr)
    result = {
        **run_record("benchmarks.zero_points", argv, load_start),
        "pairs": args.pairs,
        "rounds": args.rounds,
        "runs": args.runs,
        "rows": list(ROWS),
        "variants": result_variants,
    }
    write_results(args.out, result, markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

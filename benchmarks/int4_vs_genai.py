"""int4 speed: qgraph's default int4 against onnxruntime-genai's int4 model of the same weights, same run, interleaved.

    python -m benchmarks.int4_vs_genai [--rounds 9] [--new-tokens 64] [--configs default,head4-sym]

SmolLM2-135M-Instruct (real weights). genai's model is made by its own builder (``-p int4 -e cpu``) and run by its
own runtime (``og.Generator``, ``intra_op_num_threads`` 2); qgraph's by ``compile(precision="int4")`` (plus, for
the extra ``--configs``, the named ``quantization`` options of ``benchmarks.quant_sweep``) and qgraph's greedy loop.
Settings: batch 1 with a 16- and a 128-token prompt (decode ms/token; the 128-token prompt's TTFT is the prefill),
batch 8 with eight 16-token prompts (decode tokens/s). Every variant is loaded once in this process; each round runs
one greedy generation of ``--new-tokens`` (EOS does not stop) per setting and variant, the variants' order rotating
from round to round, after one warm-up round. Reported: medians over rounds, and the median of each round's ratio
to genai (the machine is shared: a ratio within a round is what contention disturbs least), with the CPU's model
and ISA flags and the load average. Writes ``benchmarks/results/int4_vs_genai.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from benchmarks.models import bench_dir, smollm2_dir
from benchmarks.report import RESULTS_DIR, run_header, run_record, write_results
from benchmarks.workload import SETTINGS, prompt_rows

CTX_LEN = 256
GENAI = "onnxruntime-genai int4"
# (setting, metric, better) reported per setting; prefill = the 128-token prompt's time to first token
METRICS = (
    ("b1p16", "decode_ms_per_token", "lower"),
    ("b1p128", "decode_ms_per_token", "lower"),
    ("b8p16", "decode_tok_s", "higher"),
    ("b1p128", "ttft_ms", "lower"),
)



def genai_model(model_dir: Path, threads: int) -> Path:
    """genai's int4 build of ``model_dir`` (its builder, cached), seen through a directory whose genai_config.json
    lets every generation run its full length: EOS moved to the last vocabulary id, ``threads`` intra-op threads."""
    sys.path.insert(0, str(Path(__file__).parent / "runners"))
    from run_genai import build

    built = bench_dir() / "genai-smollm2-int4"
    build({"model_dir": str(model_dir), "genai_precision": "int4"}, built)
    view = bench_dir() / f"genai-smollm2-int4-fixed-length-t{threads}"
    view.mkdir(exist_ok=True)
    for item in built.iterdir():
        if item.name != "genai_config.json" and not (view / item.name).exists():
            (view / item.name).symlink_to(item)
    config = json.loads((built / "genai_config.json").read_text())
    config["model"]["eos_token_id"] = config["model"]["vocab_size"] - 1
    config["model"]["decoder"]["session_options"]["intra_op_num_threads"] = threads
    (view / "genai_config.json").write_text(json.dumps(config, indent=2))
    return view


Timing = dict[str, float]


def genai_runner(path: Path, new_tokens: int) -> Callable[[list[list[int]]], Timing]:
    import onnxruntime_genai as og

    model = og.Model(str(path))

    def run(rows: list[list[int]]) -> Timing:
        ids = np.array(rows, dtype=np.int32)
        start = time.perf_counter()
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=ids.shape[1] + new_tokens, do_sample=False, batch_size=ids.shape[0])
        generator = og.Generator(model, params)
        generator.append_tokens(ids)
        generator.generate_next_token()
        first, first_cpu = time.perf_counter(), time.thread_time()
        for _ in range(new_tokens - 1):
            generator.generate_next_token()
        end, end_cpu = time.perf_counter(), time.thread_time()
        return _timing(start, first, end, ids.shape[0], new_tokens, end_cpu - first_cpu)

    return run


def qgraph_session_runner(
    model_dir: Path,
    cache_dir: Path,
    precision: str,
    quantization: dict,
    new_tokens: int,
    prefill_seq_len: int,
    batch_size: int,
    threads: int | None = None,
) -> tuple[Callable[[list[list[int]]], Timing], dict]:
    """A greedy generation over ``compile(precision=..., quantization=...)``'s session (qgraph's runtime loop), and
    the quantize-weights pass's report. ``threads``: the artifact loaded with that many intra-op threads (None: as
    compiled, ONNX Runtime's default)."""
    from qgraph.api import QEFFAutoModelForCausalLM
    from qgraph.backends.ort import OrtDecoderSession
    from qgraph.runtime import greedy_generate

    model = QEFFAutoModelForCausalLM.from_pretrained(str(model_dir), cache_dir=cache_dir, verbose=False)
    model.compile(
        prefill_seq_len=prefill_seq_len,
        ctx_len=CTX_LEN,
        batch_size=batch_size,
        precision=precision,
        quantization=quantization or None,
    )
    if threads is None:
        session = model.artifact.load()
    else:
        saved = json.loads((model.artifact.directory / "ort_settings.json").read_text())
        settings = saved["session_options"] | {"intra_op_num_threads": threads}
        session = OrtDecoderSession(
            model.artifact.onnx_path, settings, saved["providers"], prefill_seq_len, saved.get("graph")
        )
    counts = next(r for r in model.artifact.reports if r["name"] == "quantize-weights")["counts"]

    def run(rows: list[list[int]]) -> Timing:
        first_cpu: list[float] = []

        def on_token(index: int, token: int) -> None:
            if not first_cpu:
                first_cpu.append(time.thread_time())

        start = time.perf_counter()
        _, stats, _ = greedy_generate(
            session,
            rows,
            batch_size=len(rows),
            generation_len=new_tokens,
            eos_token_ids=set(),
            start_time=start,
            on_token=on_token,
        )
        cpu = time.thread_time() - first_cpu[0]
        return _timing(start, start + stats.ttft_s, start + stats.e2e_s, len(rows), new_tokens, cpu)

    return run, counts


def qgraph_runners(
    model_dir: Path,
    cache_dir: Path,
    quantization: dict,
    new_tokens: int,
    settings: dict[str, list[list[int]]],
    threads: int | None = None,
) -> tuple[dict[str, Callable[[list[list[int]]], Timing]], dict]:
    """One compiled int4 session per setting (prefill_seq_len = prompt length, batch_size = rows)."""
    runners, counts = {}, {}
    for name, rows in settings.items():
        runners[name], counts = qgraph_session_runner(
            model_dir, cache_dir, "int4", quantization, new_tokens, len(rows[0]), len(rows), threads
        )
    return runners, counts


def _timing(start: float, first: float, end: float, batch: int, new_tokens: int, decode_cpu: float) -> Timing:
    """Wall-clock statistics, and the calling thread's CPU time per decoded token (all of the work when ONNX
    Runtime has one intra-op thread: it then runs every kernel on the calling thread)."""
    steps = new_tokens - 1
    return {
        "ttft_ms": 1000 * (first - start),
        "decode_ms_per_token": 1000 * (end - first) / steps,
        "decode_tok_s": batch * steps / (end - first),
        "cpu_decode_ms_per_step": 1000 * decode_cpu / steps,
    }


def measure(variants: dict, prompts: dict[str, list[list[int]]], rounds: int) -> dict:
    """``variants[name][setting](rows)`` -> timing; a warm-up round, then ``rounds`` rounds, order rotating."""
    names = list(variants)
    runs: dict = {n: {s: [] for s in prompts} for n in names}
    for round_index in range(rounds + 1):
        order = names[round_index % len(names) :] + names[: round_index % len(names)]
        for setting, rows in prompts.items():
            for name in order:
                timing = variants[name][setting](rows)
                if round_index:  # round 0 warms up
                    runs[name][setting].append(timing)
        print(f"round {round_index}/{rounds} done (load {os.getloadavg()[0]:.1f})", file=sys.stderr)
    return runs


def summarize(runs: dict, metrics) -> dict:
    summary = {}
    for name, per_setting in runs.items():
        summary[name] = {}
        for setting, metric, _ in metrics:
            values = [r[metric] for r in per_setting[setting]]
            ratios = [r[metric] / g[metric] for r, g in zip(per_setting[setting], runs[GENAI][setting], strict=True)]
            summary[name][f"{setting}.{metric}"] = {
                "median": statistics.median(values),
                "min": min(values),
                "max": max(values),
                "ratio_to_genai": statistics.median(ratios),
            }
    return summary


def _table(result: dict, summary: dict, metrics, headers: list[str]) -> list[str]:
    lines = ["| variant | quantization | " + " | ".join(headers) + " |", "|---|---|" + "---|" * len(headers)]
    for name, per_metric in summary.items():
        cells = []
        for setting, metric, _ in metrics:
            s = per_metric[f"{setting}.{metric}"]
            digits = 1 if metric in ("decode_tok_s", "ttft_ms") else 2
            cell = f"{s['median']:.{digits}f} ({s['min']:.{digits}f}-{s['max']:.{digits}f})"
            if name != GENAI:
                cell += f", **{s['ratio_to_genai']:.2f}x**"
            cells.append(cell)
        quantization = result["variants"].get(name, {}).get("quantization", "its builder's `-p int4`")
        lines.append(f"| {name} | {quantization} | " + " | ".join(cells) + " |")
    return lines


def markdown(result: dict) -> str:
    lines = [
        "# int4 decode and prefill: qgraph vs onnxruntime-genai, same run",
        "",
        f"Command: `{result['command']}`  ",
        run_header(result) + " (much above the benchmark's own 2 threads means other work shared the cores; the "
        "ratios are per round).  ",
        f"SmolLM2-135M-Instruct, {result['new_tokens']} greedy tokens per generation (EOS does not stop), ctx_len "
        f"{CTX_LEN}; 1 warm-up round + {result['rounds']} rounds, variants interleaved; median (min-max), and "
        "**the median of the per-round ratio to onnxruntime-genai int4**.",
        "",
        f"Wall clock, {result['threads']} threads (qgraph: the artifact as compiled, ONNX Runtime's default thread "
        f"pool; genai: `intra_op_num_threads` {result['threads']}):",
        "",
        *_table(
            result,
            result["summary"],
            METRICS,
            ["b1 p16 decode ms/token", "b1 p128 decode ms/token", "b8 p16 decode tok/s", "b1 p128 prefill (TTFT) ms"],
        ),
    ]
    if result.get("summary_cpu"):
        lines += [
            "",
            "CPU time of the decoding thread per decode step with one intra-op thread (ONNX Runtime then runs every "
            "kernel on the calling thread, so this is all of a step's work, runtime loop included; other processes' "
            "load barely moves it):",
            "",
            *_table(
                result,
                result["summary_cpu"],
                CPU_METRICS,
                ["b1 p16 CPU ms/step", "b1 p128 CPU ms/step", "b8 p16 CPU ms/step (8 tokens)"],
            ),
        ]
    lines += [
        "",
        "Weights after quantization (qgraph's pass report): "
        + "; ".join(
            f"{n}: {v['counts']['weight_mib_after']} MiB" for n, v in result["variants"].items() if "counts" in v
        )
        + f"; onnxruntime-genai int4: {result['genai_mib']} MiB (model.onnx.data).",
    ]
    return "\n".join(lines) + "\n"


CPU_METRICS = (
    ("b1p16", "cpu_decode_ms_per_step", "lower"),
    ("b1p128", "cpu_decode_ms_per_step", "lower"),
    ("b8p16", "cpu_decode_ms_per_step", "lower"),
)


def _variants(args, configs, model_dir, prompts, threads: int | None) -> tuple[dict, dict, Path]:
    """qgraph's configurations and genai's model, each a runner per setting."""
    from benchmarks.quant_sweep import CONFIGS

    variants, described = {}, {}
    for config in configs:
        quantization = CONFIGS["int4"][config]
        name = f"qgraph int4 ({config})"
        variants[name], counts = qgraph_runners(
            model_dir, Path.home() / ".cache" / "qgraph", quantization, args.new_tokens, prompts, threads
        )
        described[name] = {"quantization": json.dumps(quantization) if quantization else "defaults", "counts": counts}
    genai_path = genai_model(model_dir, threads or args.threads)
    run = genai_runner(genai_path, args.new_tokens)
    variants[GENAI] = {s: run for s in prompts}
    return variants, described, genai_path


def main(argv: list[str] | None = None) -> int:
    from benchmarks.quant_sweep import CONFIGS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2, help="genai's intra_op_num_threads in the wall-clock runs")
    parser.add_argument(
        "--configs", default="default", help=f"qgraph int4 variants, comma-separated: {', '.join(CONFIGS['int4'])}"
    )
    parser.add_argument("--no-cpu-time", action="store_true", help="skip the one-thread CPU-time runs")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "int4_vs_genai")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model_dir = smollm2_dir()
    prompts = {s: prompt_rows(model_dir, *SETTINGS[s]) for s in ("b1p16", "b1p128", "b8p16")}
    configs = args.configs.split(",")
    load_start = os.getloadavg()
    variants, described, genai_path = _variants(args, configs, model_dir, prompts, None)
    runs = measure(variants, prompts, args.rounds)
    del variants
    runs_cpu = {}
    if not args.no_cpu_time:
        variants, _, _ = _variants(args, configs, model_dir, prompts, 1)
        runs_cpu = measure(variants, prompts, args.rounds)
        del variants
    result = {
        **run_record("benchmarks.int4_vs_genai", argv, load_start),
        "rounds": args.rounds,
        "new_tokens": args.new_tokens,
        "threads": args.threads,
        "variants": described,
        "genai_mib": round((genai_path / "model.onnx.data").stat().st_size / 2**20),
        "summary": summarize(runs, METRICS),
        "summary_cpu": summarize(runs_cpu, CPU_METRICS) if runs_cpu else {},
        "runs": runs,
        "runs_cpu": runs_cpu,
    }
    write_results(args.out, result, markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

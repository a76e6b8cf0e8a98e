"""A ~1.2B-parameter checkpoint through qgraph: export + compile wall time, peak RSS per stage, decode vs the floor.

    python -m benchmarks.scale [--new-tokens 32]

The model is Llama-3.2-1B-shaped (``benchmarks.models.llama_1b_dir``: its published config, seeded random weights,
saved as bfloat16 safetensors as the hub ships it). Each stage runs in one fresh child process that reports its own
peak RSS (VmHWM, reset between stages), so the export's peak is not hidden by the build's. Writes
``benchmarks/results/scale.{json,md}`` with the command beside the numbers. Every run exports and compiles from
scratch into a temporary cache.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT_LEN, CTX_LEN, PREFILL = 16, 256, 16
STAGES = ("export", "compile", "generate")  # each in its own process, in this order, over one cache


def _child(stage: str, model_dir: str, cache_dir: str, new_tokens: int) -> dict:
    """One stage in this fresh process (the earlier stages' results come from the shared cache): its wall time and
    the process's peak RSS (VmHWM) from start to end, so a stage's peak is never hidden by another's."""
    sys.path.insert(0, str(Path(__file__).parent / "runners"))
    from _common import peak_rss_mb

    from qgraph.api import QEFFAutoModelForCausalLM
    from qgraph.runtime import greedy_generate

    start = time.perf_counter()
    model = QEFFAutoModelForCausalLM.from_pretrained(model_dir, cache_dir=cache_dir)
    result: dict = {}
    if stage == "export":
        model.export()
    else:
        model.compile(prefill_seq_len=PREFILL, ctx_len=CTX_LEN, batch_size=1)
        result["compile_reused"] = model.artifact.reused
    if stage == "generate":
        session = model.artifact.load()
        prompt = [list(range(1000, 1000 + PROMPT_LEN))]
        times = []
        for _ in range(3):  # the first is warm-up
            _, stats, _ = greedy_generate(session, prompt, 1, new_tokens, eos_token_ids=set())
            times.append(1000 * stats.decode_s / max(1, stats.decode_tokens))
        result["decode_ms_per_token"] = statistics.median(times[1:])
        result["artifact_bytes"] = sum(
            p.stat().st_size for p in model.artifact.directory.iterdir() if p.name.startswith("model.onnx")
        )
    return result | {
        "seconds": round(time.perf_counter() - start, 1),
        "peak_rss_mib": round(peak_rss_mb()),
        "torch_imported": "torch" in sys.modules,
        "model_loaded_at_end": model.model_loaded,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(*args.child, args.new_tokens)))
        return 0

    from benchmarks.bandwidth import read_bandwidth_gbs
    from benchmarks.models import llama_1b_dir
    from benchmarks.report import write_results
    from qgraph.checkpoint import resolve_checkpoint, safetensors_header

    model_dir = llama_1b_dir()
    checkpoint = resolve_checkpoint(model_dir)
    n_params = sum(
        math.prod(t["shape"])
        for f in checkpoint.weight_files
        for name, t in safetensors_header(f).items()
        if name != "__metadata__"
    )
    cache = Path(tempfile.mkdtemp(prefix="qgraph-scale-"))
    stages, progress = {}, []
    try:
        command = [sys.executable, "-m", "benchmarks.scale", "--new-tokens", str(args.new_tokens), "--child"]
        for stage in STAGES:
            done = subprocess.run([*command, stage, str(model_dir), str(cache)], capture_output=True, text=True)
            if done.returncode != 0:
                print(done.stderr[-4000:], file=sys.stderr)
                return 1
            stages[stage] = json.loads(done.stdout.strip().splitlines()[-1])
            progress += [f"[{stage} process] {line}" for line in done.stderr.splitlines() if line.startswith("qgraph:")]
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    gbs = read_bandwidth_gbs()["read_gbs"]
    float32_bytes = 4 * n_params
    generate = stages["generate"]
    floor_ms = 1000 * generate["artifact_bytes"] / (gbs * 1e9)
    report = {
        "command": "python -m benchmarks.scale",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "load_average": os.getloadavg(),
        "model": str(model_dir.name),
        "parameters": n_params,
        "checkpoint_bytes": checkpoint.weight_bytes,
        "float32_weight_bytes": float32_bytes,
        "bandwidth_gbs": gbs,
        "floor_ms": floor_ms,
        "stages": stages,
        "decode_ms_per_token": generate["decode_ms_per_token"],
        "artifact_bytes": generate["artifact_bytes"],
        "export_peak_over_float32_bytes": stages["export"]["peak_rss_mib"] * 2**20 / float32_bytes,
        "progress_lines": progress,
    }
    write_results("scale", report, _markdown(report))
    return 0


def _markdown(r: dict) -> str:
    lines = [
        "# qgraph at 1.2B parameters",
        "",
        f"Command: `{r['command']}`  ",
        f"Date: {r['date']}; machine: {r['machine']}; load average at end {r['load_average'][0]:.2f} "
        f"(other work shares the 2 cores); read bandwidth {r['bandwidth_gbs']:.1f} GB/s.  ",
        f"Model: {r['model']}: {r['parameters'] / 1e9:.3f}B parameters, "
        f"checkpoint {r['checkpoint_bytes'] / 1e9:.2f} GB "
        f"(bfloat16), float32 weights {r['float32_weight_bytes'] / 1e9:.2f} GB.",
        "",
        "| process (fresh, one stage each) | wall s | peak RSS MiB | peak RSS / float32 weights | torch imported |",
        "|---|---|---|---|---|",
    ]
    for name, s in r["stages"].items():
        ratio = s["peak_rss_mib"] * 2**20 / r["float32_weight_bytes"]
        torch_imported = "yes" if s["torch_imported"] else "no"
        lines.append(f"| {name} | {s['seconds']} | {s['peak_rss_mib']:,} | {ratio:.2f}x | {torch_imported} |")
    lines += [
        "",
        f"Decode (batch 1, {PROMPT_LEN}-token prompt, ctx_len {CTX_LEN}, median of 2 after a warm-up): "
        f"{r['decode_ms_per_token']:.1f} ms/token; floor (artifact bytes {r['artifact_bytes'] / 1e9:.2f} GB / "
        f"bandwidth) {r['floor_ms']:.1f} ms; {r['decode_ms_per_token'] / r['floor_ms']:.2f}x the floor.",
        "The export process loads the bfloat16 checkpoint as float32, exports, and releases the torch model; the "
        "compile process starts from the cached export; the generate process finds the compiled artifact cached.",
        "",
        "Progress lines printed by qgraph:",
        "",
        "```",
        *r["progress_lines"],
        "```",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

"""qgraph against its peers: same models, same prompt tokens, same settings, same run, same machine.

    python -m benchmarks.run                       # everything (both models, all settings, all peers)
    python -m benchmarks.run --models smollm2 --settings b1p16 --peers qgraph,llamacpp-f32 --repeats 5

Each (model, setting, peer) runs in its own subprocess (its own virtual environment where the peer needs one), which
warms up, then repeats a fixed-length greedy generation (``new_tokens`` tokens, EOS not stopping) and reports timings,
peak resident memory and its tokens. ``--rounds N`` runs the whole matrix N times, interleaved, and pools the repeats
(runs on this shared machine vary between processes). Writes ``benchmarks/results/latest.{json,md,png}`` (and a
timestamped JSON): medians with min-max spread, the measured memory-bandwidth floor, greedy-token agreement with HF
transformers, and the acceptance ratios of issue 5.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

from benchmarks.peers import DEFAULT_PEERS, DEFAULT_PEERS_DIR, HERE, peers, run_job
from benchmarks.report import build_report, checks, merge, model_tables, plot
from benchmarks.workload import SETTINGS, machine_info, prompt_rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="gpt2,smollm2")
    parser.add_argument(
        "--peers-dir", type=Path, default=DEFAULT_PEERS_DIR, help="the venvs benchmarks/setup_peers.sh made"
    )
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--peers", default=DEFAULT_PEERS, help=f"any of {','.join(peers())}")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--ctx-len", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1, help="run the matrix this many times, interleaved")
    parser.add_argument("--fresh", action="store_true", help="empty qgraph's benchmark cache: time export+compile")
    parser.add_argument("--work-dir", type=Path, default=Path.home() / ".cache" / "qgraph" / "bench" / "work")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--name", default="latest", help="output file stem in --out")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per (model, setting, peer) job")
    parser.add_argument("--from-json", type=Path, help="only rebuild the .md and .png of a results JSON")
    args = parser.parse_args(argv)
    if args.from_json:
        data = json.loads(args.from_json.read_text())
        data["checks"] = checks(data)
        stem = args.from_json.with_suffix("")
        stem.with_suffix(".md").write_text(build_report(data))
        plot(data, stem.with_suffix(".png"))
        print(build_report(data))
        return 0

    from benchmarks import models as bench_models
    from benchmarks.bandwidth import read_bandwidth_gbs
    from benchmarks.gguf_convert import convert

    table = peers(args.peers_dir)
    chosen = [table[p] for p in args.peers.split(",") if p]
    settings = [s for s in args.settings.split(",") if s]
    model_names = [m for m in args.models.split(",") if m]
    args.work_dir.mkdir(parents=True, exist_ok=True)
    qcache = args.work_dir / "qgraph-cache"
    if args.fresh and qcache.exists():
        shutil.rmtree(qcache)
    command = "python -m benchmarks.run " + " ".join(argv if argv is not None else sys.argv[1:])
    notes: list[str] = []

    load_at_start = os.getloadavg()
    print("measuring memory read bandwidth ...", file=sys.stderr)
    bandwidth = read_bandwidth_gbs(threads=args.threads)
    model_dirs = {m: bench_models.MODELS[m]() for m in model_names}
    ggufs: dict[tuple[str, str], Path | None] = {}
    gguf_seconds: dict[tuple[str, str], float] = {}
    for m in model_names:
        if any(p.name == "llamacpp-f32" for p in chosen):
            path, seconds, error = convert(
                model_dirs[m], args.work_dir / "gguf" / f"{m}-f32.gguf", args.peers_dir / "llama.cpp-convert"
            )
            ggufs[(m, "fp32")], gguf_seconds[(m, "fp32")] = path, seconds
            if error:
                notes.append(f"{m}: f32 GGUF conversion failed: {error.splitlines()[-1] if error else ''}")
        if m == "smollm2":
            ggufs[(m, "q4_1")], gguf_seconds[(m, "q4_1")] = bench_models.smollm2_gguf(), 0.0

    prompts = {(m, s): prompt_rows(model_dirs[m], *SETTINGS[s]) for m in model_names for s in settings}
    results: dict[tuple[str, str, str], dict] = {}
    for round_index in range(args.rounds):
        for m in model_names:
            for s in settings:
                for peer in chosen:
                    if m not in peer.models:
                        continue
                    batch, plen = SETTINGS[s]
                    job = {
                        "model_name": m,
                        "model_dir": str(model_dirs[m]),
                        "prompt_ids": prompts[(m, s)],
                        "new_tokens": args.new_tokens,
                        "ctx_len": args.ctx_len,
                        "prefill_seq_len": plen,
                        "threads": args.threads,
                        "warmup": args.warmup,
                        "repeats": args.repeats,
                        "work_dir": str(args.work_dir),
                        "cache_dir": str(qcache),
                        **peer.job,
                    }
                    if peer.runner == "run_qgraph.py":  # the ORT backend's default pipeline for this precision
                        job["compile"] = {"precision": peer.job["precision"]}
                    if peer.runner == "run_llamacpp.py":
                        gguf = ggufs.get((m, peer.precision))
                        job["gguf"] = str(gguf) if gguf else None
                    print(
                        f"[round {round_index + 1}/{args.rounds}] {m} {s} {peer.name} ...",
                        file=sys.stderr,
                        end="",
                        flush=True,
                    )
                    t0 = time.perf_counter()
                    result = run_job(peer, job, args.timeout)
                    if peer.runner == "run_llamacpp.py":
                        result["export_s"] = gguf_seconds.get((m, peer.precision))
                    status = result.get("status")
                    extra = ""
                    if status == "ok":
                        extra = (
                            f" decode {statistics.median(r['decode_ms_per_token'] for r in result['runs']):.2f} ms/tok"
                        )
                    else:
                        extra = f" ({result.get('reason', '')[:200]})"
                    print(f" {status}{extra} [{time.perf_counter() - t0:.0f} s]", file=sys.stderr, flush=True)
                    results[(m, s, peer.name)] = merge(results.get((m, s, peer.name)), result)

    # Contention from other processes only lowers a measurement: the floor uses the best of the start and the end
    print("measuring memory read bandwidth again ...", file=sys.stderr)
    at_end = read_bandwidth_gbs(threads=args.threads)
    start_gbs = bandwidth["read_gbs"]
    bandwidth = max(bandwidth, at_end, key=lambda b: b["read_gbs"]) | {
        "read_gbs_start": start_gbs,
        "read_gbs_end": at_end["read_gbs"],
    }
    data: dict = {
        "command": command,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": machine_info(),
        "bandwidth": bandwidth,
        "models": {},
        "notes": notes,
        "versions": {},
    }
    data["models"] = model_tables(results, chosen, settings, model_names, bandwidth, data["versions"])
    notes.append(
        "qgraph rows are timed in qgraph's own runtime loop (the one `generate` runs) with no EOS stop; TTFT = "
        "prefill + first argmax. For batch > 1 HF/optimum cannot stream, so their TTFT is a separate 1-token generate."
    )
    notes.append(
        "Peak RSS 'gen' is the process's peak during the timed generations (reset after warm-up); 'all' includes "
        "loading, export/compile and warm-up (qgraph's includes the PyTorch model it exports from)."
    )
    data["machine"]["load_average_1_5_15"] = load_at_start
    data["machine"]["load_average_at_end"] = os.getloadavg()
    data["checks"] = checks(data)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    text = json.dumps(data, indent=1, default=str)
    (args.out / f"{args.name}.json").write_text(text)
    (args.out / f"bench-{stamp}.json").write_text(text)
    (args.out / f"{args.name}.md").write_text(build_report(data))
    try:
        plot(data, args.out / f"{args.name}.png")
    except ImportError:
        print("matplotlib is not installed (benchmarks/setup_peers.sh main): no plot", file=sys.stderr)
    print(build_report(data))
    print(f"wrote {args.out / (args.name + '.json')}, .md, .png", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

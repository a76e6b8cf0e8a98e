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
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
RUNNERS = HERE / "runners"
DEFAULT_PEERS_DIR = Path("/work/peers")  # where benchmarks/setup_peers.sh puts the peers' venvs by default

# A fixed English passage; prompts are its first N tokens (batch rows start at different sentences).
PASSAGE = (
    "The history of the city begins with a small settlement on the river, where fishermen traded with farmers from "
    "the hills. Over the centuries the village grew into a market town, and the market town into a city with stone "
    "bridges, a cathedral and a university. Merchants came from distant countries to sell spices, cloth and metal "
    "tools, and scholars came to study medicine, law and astronomy. In the winter the river froze and children "
    "skated between the boats; in the summer the streets were full of music and the smell of bread. The city "
    "survived fires, floods and wars, and each time its people rebuilt the walls, the houses and the schools. Today "
    "it is known for its museums, its gardens and its libraries, which hold books written by hand a thousand years "
    "ago. Visitors walk along the old harbour, climb the tower of the cathedral and eat fresh fish in the small "
    "restaurants near the water. Many of them say that the best time to visit is early autumn, when the trees turn "
    "red and gold and the evenings are still warm enough to sit outside. The university still teaches thousands of "
    "students every year, and its observatory on the hill is open to the public on clear nights."
)

SETTINGS = {  # name: (batch, prompt tokens)
    "b1p16": (1, 16),
    "b1p128": (1, 128),
    "b8p16": (8, 16),
}


@dataclass
class Peer:
    name: str
    runner: str
    python: str  # interpreter path or "main"
    precision: str  # what the weights are while computing: fp32 / int8 / int4 / q4_1
    label: str
    models: tuple[str, ...] = ("gpt2", "smollm2")
    job: dict = field(default_factory=dict)


def peers(peers_dir: Path = DEFAULT_PEERS_DIR) -> dict[str, Peer]:
    venv = lambda name: str(peers_dir / name / "bin" / "python")  # noqa: E731
    table = [
        Peer("hf", "run_hf.py", "main", "fp32", "HF transformers eager (PyTorch)"),
        Peer("qgraph", "run_qgraph.py", "main", "fp32", "qgraph ORT float32", job={"precision": "float32"}),
        Peer(
            "qgraph-int8", "run_qgraph.py", "main", "int8", "qgraph ORT int8 (MatMulNBits)", job={"precision": "int8"}
        ),
        Peer(
            "qgraph-int4", "run_qgraph.py", "main", "int4", "qgraph ORT int4 (MatMulNBits)", job={"precision": "int4"}
        ),
        Peer("genai", "run_genai.py", "main", "fp32", "onnxruntime-genai fp32", models=("smollm2",)),
        Peer(
            "genai-int4",
            "run_genai.py",
            "main",
            "int4",
            "onnxruntime-genai int4",
            models=("smollm2",),
            job={"genai_precision": "int4"},
        ),
        Peer("llamacpp-f32", "run_llamacpp.py", venv("llamacpp"), "fp32", "llama.cpp f32 (GGUF from HF)"),
        Peer(
            "llamacpp-q4_1",
            "run_llamacpp.py",
            venv("llamacpp"),
            "q4_1",
            "llama.cpp Q4_1 (GGUF as shipped)",
            models=("smollm2",),
        ),
        Peer("optimum", "run_optimum.py", venv("optimum"), "fp32", "optimum-onnx ORTModelForCausalLM"),
    ]
    return {p.name: p for p in table}


DEFAULT_PEERS = "hf,qgraph,qgraph-int8,qgraph-int4,genai,genai-int4,llamacpp-f32,llamacpp-q4_1,optimum"
FP32_PEERS = ("genai", "llamacpp-f32", "optimum", "hf")


# -- preparation --------------------------------------------------------------------------------------------------


def prompt_rows(model_dir: Path, batch: int, length: int) -> list[list[int]]:
    """``batch`` rows of exactly ``length`` token ids from the passage (row i starts at sentence i)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    sentences = PASSAGE.split(". ")
    rows = []
    for i in range(batch):
        text = ". ".join(sentences[i:] + sentences[:i])
        ids = tokenizer(text)["input_ids"]
        if len(ids) < length:
            raise SystemExit(f"passage too short for {length} tokens")
        rows.append(ids[:length])
    return rows


def machine_info() -> dict:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for dist in (
        "qgraph",
        "torch",
        "transformers",
        "onnx",
        "onnxruntime",
        "onnx-ir",
        "onnxscript",
        "numpy",
        "onnxruntime-genai",
        "matplotlib",
    ):
        try:
            from importlib.metadata import version

            versions[dist] = version(dist)
        except Exception:
            versions[dist] = None
    mem = None
    try:
        mem = int(Path("/proc/meminfo").read_text().split()[1]) / 2**20
    except (OSError, ValueError, IndexError):
        pass
    return {
        "cpu": cpu or platform.processor(),
        "logical_cores": os.cpu_count(),
        "memory_gib": round(mem, 1) if mem else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_average_1_5_15": os.getloadavg(),
        "versions_main_env": versions,
    }


# -- running ------------------------------------------------------------------------------------------------------


def run_job(peer: Peer, job: dict, timeout: int) -> dict:
    python = sys.executable if peer.python == "main" else peer.python
    if not Path(python).exists():
        return {"peer": peer.name, "status": "skipped", "reason": f"{python} not found: run benchmarks/setup_peers.sh"}
    with tempfile.TemporaryDirectory() as tmp:
        job_file, out_file = Path(tmp) / "job.json", Path(tmp) / "result.json"
        job_file.write_text(json.dumps(job))
        env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
        env.pop("PYTHONPATH", None)
        try:
            done = subprocess.run(
                [python, str(RUNNERS / peer.runner), str(job_file), str(out_file)],
                capture_output=True,
                text=True,
                timeout=timeout,
                env=env,
            )
        except subprocess.TimeoutExpired:
            return {"peer": peer.name, "status": "error", "reason": f"timed out after {timeout} s"}
        if not out_file.exists():
            return {"peer": peer.name, "status": "error", "reason": f"runner crashed: {done.stderr.strip()[-800:]}"}
        return json.loads(out_file.read_text())


def merge(a: dict | None, b: dict) -> dict:
    """Pool the runs of two rounds of the same job (first round's load/compile numbers are kept)."""
    if a is None or a.get("status") != "ok":
        return b
    if b.get("status") != "ok":
        return a
    a["runs"] += b["runs"]
    a["peak_rss_generate_mb"] = max(a["peak_rss_generate_mb"], b["peak_rss_generate_mb"])
    return a


# -- summarising --------------------------------------------------------------------------------------------------

METRICS = ("ttft_s", "prefill_tok_s", "decode_ms_per_token", "decode_tok_s", "total_tok_s", "e2e_s")


def summarise(result: dict) -> dict:
    if result.get("status") != "ok":
        return {}
    out = {}
    for m in METRICS:
        values = [r[m] for r in result["runs"]]
        out[m] = {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}
    return out


def agreement(tokens: list[list[int]] | None, reference: list[list[int]] | None) -> dict | None:
    """Greedy agreement: identical rows, shortest common prefix, and fraction of equal positions."""
    if not tokens or not reference:
        return None
    prefixes, equal, total = [], 0, 0
    for row, ref in zip(tokens, reference, strict=False):
        n = min(len(row), len(ref))
        prefix = next((i for i in range(n) if row[i] != ref[i]), n)
        prefixes.append(prefix)
        equal += sum(1 for i in range(n) if row[i] == ref[i])
        total += n
    return {
        "match": all(p == len(r) for p, r in zip(prefixes, reference, strict=False)) and len(tokens) == len(reference),
        "common_prefix": min(prefixes),
        "equal_fraction": equal / total if total else 0.0,
    }


def fmt(x: float | None, digits: int = 1) -> str:
    return "–" if x is None else f"{x:,.{digits}f}"


def spread(s: dict, m: str, scale: float = 1.0, digits: int = 1) -> str:
    d = s[m]
    return f"{d['median'] * scale:.{digits}f} ({d['min'] * scale:.{digits}f}–{d['max'] * scale:.{digits}f})"


def build_report(data: dict) -> str:
    bw = data["bandwidth"]["read_gbs"]
    lines = [
        "# qgraph benchmark",
        "",
        f"Command: `{data['command']}`  ",
        f"Date: {data['date']}; machine: {data['machine']['cpu']}, {data['machine']['logical_cores']} cores, "
        f"{data['machine']['memory_gib']} GiB, load average {_load(data, 'load_average_1_5_15')} at start / "
        f"{_load(data, 'load_average_at_end')} at end (other developers share the 2 cores); "
        f"measured read bandwidth {bw:.1f} GB/s "
        + (
            f"(best of the run's start {data['bandwidth']['read_gbs_start']:.1f} and end "
            f"{data['bandwidth']['read_gbs_end']:.1f}; "
            if "read_gbs_end" in data["bandwidth"]
            else "("
        )
        + f"{data['bandwidth']['threads']} threads, {data['bandwidth']['buffer_mib']} MiB buffer, best of "
        f"{data['bandwidth']['repeats']}).  ",
        f"Each row: {data['args']['warmup']} warm-up + {data['args']['repeats']} × {data['args']['rounds']} round(s) "
        f"of a {data['args']['new_tokens']}-token greedy generation (EOS does not stop), ctx_len "
        f"{data['args']['ctx_len']}, {data['args']['threads']} threads; median (min–max). "
        "Floor = weight bytes read per decoded token / read bandwidth; 'x floor' = decode ms/token ÷ floor. "
        "Tokens vs HF: identical greedy tokens, or the first position where they differ / share of equal positions.",
        "",
    ]
    for model, info in data["models"].items():
        lines += [f"## {model}", "", f"{info['description']}", ""]
        header = (
            "| setting | peer | TTFT ms | prefill tok/s | decode ms/token | decode tok/s | total tok/s | "
            "peak RSS MiB (gen / all) | export+compile s | floor ms | x floor | tokens vs HF |"
        )
        lines += [header, "|" + "---|" * (header.count("|") - 1)]
        for setting, rows in info["settings"].items():
            for row in rows:
                s = row["summary"]
                if not s:
                    lines.append(
                        f"| {setting} | {row['label']} | {row['status']}: {row.get('reason', '')[:110]} "
                        "| | | | | | | | | |"
                    )
                    continue
                ag = row.get("vs_hf")
                if row["peer"] == "hf":
                    tok = "reference"
                elif ag is None:
                    tok = "–"
                elif ag["match"]:
                    tok = "match"
                else:
                    tok = f"differ at {ag['common_prefix']} ({100 * ag['equal_fraction']:.0f}% equal)"
                build = row.get("build_s")
                build_text = "–" if build is None else (f"{build:.1f}" + (" (cached)" if row.get("cached") else ""))
                rss = f"{fmt(row.get('rss_gen'), 0)} / {fmt(row.get('rss_all'), 0)}"
                lines.append(
                    f"| {setting} | {row['label']} | {spread(s, 'ttft_s', 1000)}"
                    f" | {fmt(s['prefill_tok_s']['median'], 0)} | {spread(s, 'decode_ms_per_token', 1, 2)}"
                    f" | {fmt(s['decode_tok_s']['median'])} | {fmt(s['total_tok_s']['median'])} | {rss}"
                    f" | {build_text} | {fmt(row.get('floor_ms'), 2)} | {fmt(row.get('x_floor'), 2)} | {tok} |"
                )
        lines.append("")
        if info.get("quantized_agreement"):
            lines += ["Greedy agreement of quantized qgraph with qgraph float32 and with HF (batch-1 settings):", ""]
            for item in info["quantized_agreement"]:
                lines.append(
                    f"- {item['setting']} {item['peer']}: vs float32 common prefix {item['vs_fp32']['common_prefix']}"
                    f"/{data['args']['new_tokens']}, {100 * item['vs_fp32']['equal_fraction']:.0f}% equal; vs HF "
                    f"common prefix {item['vs_hf']['common_prefix']}, {100 * item['vs_hf']['equal_fraction']:.0f}%"
                )
            lines.append("")
    lines += ["## Acceptance ratios (issue 5, batch 1 medians of this run)", ""]
    for check in data["checks"]:
        mark = {True: "met", False: "NOT met", None: "n/a"}[check["met"]]
        lines.append(f"- {check['what']}: {check['value']} (bar {check['bar']}) — **{mark}**")
    lines += ["", "## Notes", ""] + [f"- {n}" for n in data["notes"]]
    lines += ["", "Library versions per peer:", ""]
    for peer, versions in sorted(data["versions"].items()):
        lines.append(f"- {peer}: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    return "\n".join(lines) + "\n"


def _load(data: dict, key: str) -> str:
    value = data["machine"].get(key)
    return f"{value[0]:.2f}" if value else "not recorded"


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def checks(data: dict) -> list[dict]:
    """The issue's bars, computed from this run's medians (n/a where a side is missing)."""
    out = []

    def med(model, setting, peer, metric):
        for row in data["models"].get(model, {}).get("settings", {}).get(setting, []):
            if row["peer"] == peer and row["summary"]:
                return row["summary"][metric]["median"]
        return None

    def row_of(model, setting, peer):
        return next(
            (r for r in data["models"].get(model, {}).get("settings", {}).get(setting, []) if r["peer"] == peer), {}
        )

    def add(what, value, bar, limit, lower_is_better=True):
        met = None if value is None else (value <= limit if lower_is_better else value >= limit)
        out.append({"what": what, "value": "–" if value is None else f"{value:.2f}", "bar": bar, "met": met})

    for model in data["models"]:
        for setting in ("b1p16", "b1p128"):
            q = med(model, setting, "qgraph", "decode_ms_per_token")
            fp32 = {p: med(model, setting, p, "decode_ms_per_token") for p in ("genai", "llamacpp-f32")}
            fp32 = {p: v for p, v in fp32.items() if v is not None}
            best = min(fp32.items(), key=lambda kv: kv[1]) if fp32 else (None, None)
            add(
                f"{model} {setting}: float32 decode ms/token ÷ best float32 peer ({best[0]})",
                ratio(q, best[1]),
                "≤ 1.0",
                1.0,
            )
            add(
                f"{model} {setting}: float32 decode ms/token ÷ bandwidth floor",
                row_of(model, setting, "qgraph").get("x_floor"),
                "≤ 1.2",
                1.2,
            )
        if model == "smollm2":
            for setting in ("b1p16", "b1p128"):
                add(
                    f"smollm2 {setting}: int4 decode ms/token ÷ llama.cpp Q4_1",
                    ratio(
                        med(model, setting, "qgraph-int4", "decode_ms_per_token"),
                        med(model, setting, "llamacpp-q4_1", "decode_ms_per_token"),
                    ),
                    "≤ 0.8",
                    0.8,
                )
        for setting in ("b1p16", "b1p128"):
            for variant in ("qgraph", "qgraph-int4"):
                mine = med(model, setting, variant, "ttft_s")
                others = {
                    p: med(model, setting, p, "ttft_s")
                    for p in ("hf", "genai", "llamacpp-f32", "llamacpp-q4_1", "optimum")
                }
                if variant == "qgraph":  # float32 against float32 peers
                    others.pop("llamacpp-q4_1")
                others = {p: v for p, v in others.items() if v is not None}
                best = min(others.items(), key=lambda kv: kv[1]) if others else (None, None)
                add(f"{model} {setting}: {variant} TTFT ÷ best peer's ({best[0]})", ratio(mine, best[1]), "≤ 1.0", 1.0)
        for variant in ("qgraph", "qgraph-int4"):
            b8 = med(model, "b8p16", variant, "decode_tok_s")
            b1 = med(model, "b1p16", variant, "decode_tok_s")
            add(
                f"{model}: {variant} batch-8 decode tokens/s ÷ batch-1",
                ratio(b8, b1),
                "≥ 4",
                4.0,
                lower_is_better=False,
            )
    return out


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(data["models"])
    fig, axes = plt.subplots(len(models), 3, figsize=(18, 4.6 * len(models)), squeeze=False)
    for r, model in enumerate(models):
        settings = data["models"][model]["settings"]
        for c, (setting, metric, title, scale) in enumerate(
            [
                ("b1p16", "decode_ms_per_token", "decode ms/token, batch 1, 16-token prompt", 1),
                ("b1p128", "ttft_s", "TTFT ms, batch 1, 128-token prompt", 1000),
                ("b8p16", "decode_tok_s", "decode tokens/s, batch 8", 1),
            ]
        ):
            ax = axes[r][c]
            rows = [row for row in settings.get(setting, []) if row["summary"]]
            labels = [row["label"] for row in rows]
            med = [row["summary"][metric]["median"] * scale for row in rows]
            lo = [m - row["summary"][metric]["min"] * scale for m, row in zip(med, rows, strict=True)]
            hi = [row["summary"][metric]["max"] * scale - m for m, row in zip(med, rows, strict=True)]
            colors = ["tab:blue" if row["peer"].startswith("qgraph") else "tab:gray" for row in rows]
            ax.barh(labels, med, xerr=[lo, hi], color=colors, capsize=3)
            ax.invert_yaxis()
            ax.set_title(f"{model}: {title}", fontsize=10)
            ax.tick_params(axis="y", labelsize=8)
            if metric == "decode_ms_per_token":
                floors = {row["precision"]: row.get("floor_ms") for row in rows if row.get("floor_ms")}
                for prec, style in (("fp32", "--"), ("int4", ":")):
                    if floors.get(prec):
                        ax.axvline(floors[prec], color="tab:red", linestyle=style, label=f"{prec} bandwidth floor")
                ax.legend(fontsize=8)
    fig.suptitle(
        f"qgraph vs peers — {data['machine']['cpu']}, {data['machine']['logical_cores']} cores (`{data['command']}`)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# -- main ---------------------------------------------------------------------------------------------------------


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
    bw = bandwidth["read_gbs"] * 1e9
    for m in model_names:
        descr = {
            "gpt2": "GPT-2 124M (GPT2Config(), random weights, seed 0; real GPT-2 tokenizer)",
            "smollm2": "SmolLM2-135M-Instruct (real weights, dequantized from the shipped Q4_1 GGUF to float32: "
            "llama.cpp's Q4_1 row runs exactly the reference weights, every other quantization re-rounds them)",
        }[m]
        info = {"description": descr, "settings": {}, "quantized_agreement": []}
        for s in settings:
            fp32_bytes = None
            q = results.get((m, s, "qgraph"))
            if q and q.get("status") == "ok":
                fp32_bytes = q.get("weight_bytes")
            rows = []
            hf = results.get((m, s, "hf"))
            hf_tokens = hf.get("tokens") if hf and hf.get("status") == "ok" else None
            for peer in chosen:
                if (m, s, peer.name) not in results:
                    continue
                r = results[(m, s, peer.name)]
                summary = summarise(r)
                weight_bytes = r.get("weight_bytes") or (fp32_bytes if peer.precision == "fp32" else None)
                floor_ms = 1000 * weight_bytes / bw if weight_bytes else None
                row = {
                    "peer": peer.name,
                    "label": peer.label,
                    "precision": peer.precision,
                    "status": r.get("status"),
                    "reason": r.get("reason", ""),
                    "summary": summary,
                    "rss_gen": r.get("peak_rss_generate_mb"),
                    "rss_all": max(r.get("peak_rss_load_mb") or 0, r.get("peak_rss_generate_mb") or 0) or None,
                    "weight_bytes": weight_bytes,
                    "floor_ms": floor_ms,
                    "x_floor": (summary["decode_ms_per_token"]["median"] / floor_ms)
                    if summary and floor_ms and SETTINGS[s][0] == 1
                    else None,
                    "vs_hf": agreement(r.get("tokens"), hf_tokens) if peer.name != "hf" else None,
                    "tokens": r.get("tokens"),
                    "raw": {k: v for k, v in r.items() if k not in ("tokens",)},
                }
                if r.get("status") == "ok":
                    build = (r.get("export_s") or 0.0) + (r.get("compile_s") or 0.0)
                    row["build_s"] = build if ("export_s" in r or "compile_s" in r) else None
                    row["cached"] = bool(r.get("compile_reused")) or (r.get("export_s") == 0.0)
                    data["versions"][peer.name] = r.get("versions", {})
                rows.append(row)
            fp32_tokens = q.get("tokens") if q and q.get("status") == "ok" else None
            for row in rows:
                if row["peer"] in ("qgraph-int8", "qgraph-int4") and row["tokens"] and fp32_tokens and hf_tokens:
                    info["quantized_agreement"].append(
                        {
                            "setting": s,
                            "peer": row["peer"],
                            "vs_fp32": agreement(row["tokens"], fp32_tokens),
                            "vs_hf": agreement(row["tokens"], hf_tokens),
                        }
                    )
            info["settings"][s] = rows
        data["models"][m] = info
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

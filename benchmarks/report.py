"""From the peers' raw results to the report: pooled rounds, medians with spread, floors, agreement with HF, the
acceptance checks, the Markdown table and the plot."""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

from benchmarks.workload import SETTINGS, isa_flags, machine_info


def run_record(module: str, argv: list[str] | None, load_start: tuple[float, ...]) -> dict:
    """What a benchmark's result starts with: the command that reproduces it, when, on which CPU (its ISA flags
    choose the kernels) and the load average at start and now (how quiet the cores were)."""
    return {
        "command": f"python -m {module} " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": machine_info(),
        "isa_flags": isa_flags(),
        "load_start": load_start,
        "load_end": os.getloadavg(),
    }


def run_header(result: dict) -> str:
    """The Markdown line saying when, on what and under which load a ``run_record`` result was measured."""
    machine = result["machine"]
    return (
        f"Date: {result['date']}; CPU: {machine['cpu']}, {machine['logical_cores']} cores; ISA flags: "
        f"{' '.join(result['isa_flags']) or 'none found'}; load average {result['load_start'][0]:.1f} at start, "
        f"{result['load_end'][0]:.1f} at end"
    )


def merge(a: dict | None, b: dict) -> dict:
    """Pool the runs of two rounds of the same job (first round's load/compile numbers are kept)."""
    if a is None or a.get("status") != "ok":
        return b
    if b.get("status") != "ok":
        return a
    a["runs"] += b["runs"]
    a["peak_rss_generate_mb"] = max(a["peak_rss_generate_mb"], b["peak_rss_generate_mb"])
    return a


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


def model_tables(
    results: dict, chosen: list, settings: list[str], model_names: list[str], bandwidth: dict, versions: dict
) -> dict:
    """Per model and setting, one row per peer: summary, floor, memory, agreement (and int8/int4 vs float32)."""
    models: dict = {}
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
                    versions[peer.name] = r.get("versions", {})
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
        models[m] = info
    return models


RESULTS_DIR = Path(__file__).parent / "results"


def write_results(name: str | Path, data: dict, markdown: str) -> None:
    """``NAME.json`` (the data) and ``NAME.md`` (what a reader sees), printed as well: a plain name goes to
    ``results/``, a path (a benchmark's ``--out``) where it points."""
    stem = Path(name) if isinstance(name, Path) else RESULTS_DIR / name
    stem = stem.with_suffix("") if stem.suffix in (".json", ".md") else stem
    stem.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{stem}.json").write_text(json.dumps(data, indent=2))
    Path(f"{stem}.md").write_text(markdown)
    print(markdown)

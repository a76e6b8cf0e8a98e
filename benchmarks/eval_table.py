"""Quality of each precision on SmolLM2-135M-Instruct: ``qgraph eval`` rows beside onnxruntime-genai's own models.

    python -m benchmarks.eval_table [--precisions float32,float16,int8,int4] [--genai int4,fp32] [--ctx-len 512]
                                    [--stride 256] [--name eval]

Every row is scored over the same token ids (the default ``qgraph eval`` text: Debian's licence texts, tokenized by
SmolLM2's tokenizer) and the same windows (``qgraph.perplexity``): qgraph's rows through ``qgraph.evaluation`` (the
compiled artifact and session ``generate`` uses, with logits at every position), HF transformers' float32 model, and
onnxruntime-genai's int4 and fp32 models made by its own model builder from the same HF directory
(``-p int4|fp32 -e cpu``; block size 32, accuracy_level 4, LM head and embeddings 4-bit), run through its own Python
API: one ``Generator`` per window, the window's ids appended at once, ``get_output("logits")`` giving every appended
position's logits. Perplexity, its change relative to qgraph float32, and top-1 agreement with qgraph float32 and
with HF. Scores are cached (``~/.cache/qgraph/eval``); scoring times are wall time on a shared machine (contended).
Writes ``benchmarks/results/NAME.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from benchmarks.models import bench_dir, smollm2_dir
from benchmarks.report import write_results
from benchmarks.workload import machine_info
from qgraph.cache import DEFAULT_CACHE_DIR, digest
from qgraph.evaluation import (
    HF,
    SCORING_VERSION,
    ScoredRun,
    TextTokens,
    cached_scores,
    hf_scores,
    qgraph_scores,
    text_tokens,
)
from qgraph.perplexity import DEFAULT_CTX_LEN, DEFAULT_STRIDE, TokenScores, score_window
from qgraph.progress import ProgressBar

THREADS = 2


def genai_model_dir(precision: str, model_dir: Path, cache_dir: Path) -> Path:
    """onnxruntime-genai's builder output for ``model_dir`` at ``precision`` (built once, as the speed benchmark's
    genai peer builds it), with ``intra_op_num_threads`` set as in the speed benchmark."""
    from benchmarks.runners.run_genai import build

    out = bench_dir(cache_dir) / f"genai-smollm2-{precision}"
    build({"model_dir": str(model_dir), "genai_precision": precision}, out)
    config_path = out / "genai_config.json"
    config = json.loads(config_path.read_text())
    session = config["model"]["decoder"].setdefault("session_options", {})
    if session.get("intra_op_num_threads") != THREADS:
        session["intra_op_num_threads"] = THREADS
        config_path.write_text(json.dumps(config, indent=2))
    return out


def score_genai(genai_dir: Path, tokens: TextTokens, bar: ProgressBar) -> TokenScores:
    """Each window through onnxruntime-genai from a fresh generator (empty KV cache), all positions' logits."""
    import numpy as np
    import onnxruntime_genai as og

    model = og.Model(str(genai_dir))
    parts = []
    for window in tokens.windows:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=tokens.ctx_len + 1, do_sample=False)
        generator = og.Generator(model, params)
        generator.append_tokens(np.ascontiguousarray(tokens.ids[window.begin : window.end], dtype=np.int32))
        logits = np.asarray(generator.get_output("logits"))
        parts.append(score_window(logits[0], tokens.ids, window))
        del generator
        bar.advance()
    return TokenScores.concatenate(parts)


def genai_scores(precision: str, genai_dir: Path, tokens: TextTokens, cache_dir: Path) -> ScoredRun:
    files = {p.name: [p.stat().st_size, int(p.stat().st_mtime)] for p in sorted(genai_dir.glob("model.onnx*"))}
    key = digest({"genai": genai_dir.name, "files": files, **tokens.key, "v": SCORING_VERSION})
    label = f"onnxruntime-genai {precision}"
    return cached_scores(
        cache_dir / "eval" / f"genai-{key}",
        label,
        lambda bar: score_genai(genai_dir, tokens, bar),
        len(tokens.windows),
        verbose=True,
    )


def quantizer_settings(run: ScoredRun) -> str:
    """``quantize-weights``' options in the run's pipeline and what it did (from the artifact's pass report)."""
    spec = next((p for p in run.pipeline or [] if p["name"] == "quantize-weights"), None)
    if spec is None:
        return ""
    reports = json.loads((Path(run.artifact) / "passes.json").read_text())
    counts = next((r["counts"] for r in reports if r["name"] == "quantize-weights"), {})
    options = ", ".join(f"{k}={v}" for k, v in sorted(spec["options"].items())) or "pass defaults"
    return f"options: {options}; " + ", ".join(f"{k}={v}" for k, v in counts.items())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precisions", default="float32,float16,int8,int4", help="qgraph rows ('' for none)")
    parser.add_argument("--genai", default="int4,fp32", help="onnxruntime-genai rows ('' for none)")
    parser.add_argument("--ctx-len", type=int, default=DEFAULT_CTX_LEN)
    parser.add_argument("--stride", type=int, default=DEFAULT_STRIDE)
    parser.add_argument("--name", default="eval", help="results file name under benchmarks/results")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR)
    args = parser.parse_args(argv)
    precisions = [p for p in args.precisions.split(",") if p]
    genai = [p for p in args.genai.split(",") if p]
    load_start = os.getloadavg()[0]
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())

    from qgraph import QEFFAutoModelForCausalLM

    model_dir = smollm2_dir(args.cache_dir)
    model = QEFFAutoModelForCausalLM.from_pretrained(model_dir, cache_dir=args.cache_dir)
    tokens = text_tokens(model, None, None, args.ctx_len, args.stride)
    qgraph_runs = {f"qgraph {p}": qgraph_scores(model, tokens, precision=p) for p in precisions}
    float32 = qgraph_scores(model, tokens) if precisions else None  # cached when float32 is a row
    hf = hf_scores(model, tokens)
    peers = {p: genai_model_dir(p, model_dir, args.cache_dir) for p in genai}
    peer_runs = {f"genai {p}": genai_scores(p, d, tokens, args.cache_dir) for p, d in peers.items()}
    runs = qgraph_runs | {HF: hf} | peer_runs
    rows = []
    for name, run in runs.items():
        rows.append(
            {
                "row": name,
                "label": run.label,
                "perplexity": run.scores.perplexity,
                "relative_change_vs_qgraph_float32": run.scores.perplexity / float32.scores.perplexity - 1
                if float32
                else None,
                "top1_agreement_qgraph_float32": run.scores.agreement(float32.scores) if float32 else None,
                "top1_agreement_hf": run.scores.agreement(hf.scores),
                "scoring_s": run.seconds,
                "reused": run.reused,
                "artifact": run.artifact,
                "pipeline": run.pipeline,
                "quantizer": quantizer_settings(run),
            }
        )
    data = {
        "started": started,
        "model": str(model_dir),
        "text": tokens.source,
        "text_tokens": int(tokens.ids.size),
        "ctx_len": args.ctx_len,
        "stride": args.stride,
        "method": f"{len(tokens.windows)} windows of ctx_len {args.ctx_len} every {args.stride} tokens, each from "
        f"an empty KV cache scoring only its new tokens ({sum(w.scored for w in tokens.windows)} scored)",
        "rows": rows,
        "load_average": {"start": load_start, "end": os.getloadavg()[0]},
        "machine": machine_info(),
    }
    write_results(args.name, data, markdown(data))
    return 0


def markdown(data: dict) -> str:
    lines = [
        f"# Perplexity of SmolLM2-135M-Instruct by precision ({data['started']})",
        "",
        "`python -m benchmarks.eval_table` — text: " + data["text"] + f", {data['text_tokens']} tokens;",
        f"{data['method']}.",
        "",
        "| model | perplexity | vs qgraph float32 | top-1 = qgraph float32 | top-1 = HF | scoring s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in data["rows"]:
        seconds = "cached" if row["reused"] else f"{row['scoring_s']:.0f}"
        change, same = row["relative_change_vs_qgraph_float32"], row["top1_agreement_qgraph_float32"]
        lines.append(
            f"| {row['label']} | {row['perplexity']:.3f} | {'-' if change is None else f'{change:+.2%}'} | "
            f"{'-' if same is None else f'{same:.2%}'} | {row['top1_agreement_hf']:.2%} | {seconds} |"
        )
    lines += [""]
    for row in data["rows"]:
        if row["quantizer"]:
            lines.append(f"- {row['label']}: quantize-weights {row['quantizer']}")
    load = data["load_average"]
    lines += [
        f"- machine: {data['machine'].get('cpu', '')}; load average {load['start']:.1f} at start, {load['end']:.1f} "
        "at the end (scoring times are contended wall times, not speed measurements)",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())

"""The quantization sweep the int4 / int8 defaults were chosen from: quality and speed of each quantize-weights
configuration on SmolLM2-135M-Instruct, same run.

    python -m benchmarks.quant_sweep [--precisions int4,int8] [--configs a,b] [--rounds 5]

Each configuration is ``compile(precision=..., quantization=CONFIGS[precision][name])`` (every option spelled out,
so a row means the same thing whatever the defaults are). Per configuration: perplexity over the ``qgraph eval``
text (``qgraph.evaluation``) with its change relative to float32 and top-1 agreement with float32; decode ms/token at
batch 1 (16-token prompt), decode tokens/s at batch 8, and the 128-token prompt's prefill (TTFT), measured like
``benchmarks.int4_vs_genai`` (one process, configurations interleaved round by round, medians, per-round ratios to
the first configuration). Writes ``benchmarks/results/quant_sweep.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

from benchmarks.int4_vs_genai import measure
from benchmarks.models import smollm2_dir
from benchmarks.report import RESULTS_DIR, run_header, run_record, write_results
from benchmarks.workload import SETTINGS, prompt_rows
from qgraph.pipelines import QUANTIZATION_DEFAULTS

CACHE_DIR = Path.home() / ".cache" / "qgraph"
RTN_INT4 = {"bits": 4, "block_size": 32, "accuracy_level": 4, "algorithm": "rtn"}
MINMAX_INT4 = RTN_INT4 | {"algorithm": "minmax", "symmetric": False}
RTN_INT8 = {"bits": 8, "block_size": 32, "accuracy_level": 4}

# name -> the quantize-weights options (bits included); "default" = what compile(precision=...) does
CONFIGS: dict[str, dict[str, dict]] = {
    "int4": {
        "default": {},
        "asym-head8": RTN_INT4 | {"symmetric": False, "head_bits": 8},
        "sym-head8": RTN_INT4 | {"symmetric": True, "head_bits": 8},
        "asym-head4": RTN_INT4 | {"symmetric": False, "head_bits": 4},
        "sym-head4": RTN_INT4 | {"symmetric": True, "head_bits": 4},
        "asym-head8-b64": RTN_INT4 | {"symmetric": False, "head_bits": 8, "block_size": 64},
        "asym-head8-b128": RTN_INT4 | {"symmetric": False, "head_bits": 8, "block_size": 128},
        "sym-head8-b128": RTN_INT4 | {"symmetric": True, "head_bits": 8, "block_size": 128},
        "asym-head8-acc1": RTN_INT4 | {"symmetric": False, "head_bits": 8, "accuracy_level": 1},
        "asym-head8-emb8": RTN_INT4 | {"symmetric": False, "head_bits": 8, "embedding_bits": 8},
        "hqq-head8": RTN_INT4 | {"algorithm": "hqq", "symmetric": False, "head_bits": 8, "float_zero_points": "split"},
        "hqq-head4": RTN_INT4 | {"algorithm": "hqq", "symmetric": False, "head_bits": 4, "float_zero_points": "split"},
        "hqq-input-head8": RTN_INT4
        | {"algorithm": "hqq", "symmetric": False, "head_bits": 8, "float_zero_points": "input"},
        "minmax-head8": MINMAX_INT4 | {"head_bits": 8, "float_zero_points": "split"},
        "minmax-head4": MINMAX_INT4 | {"head_bits": 4, "float_zero_points": "split"},
        "minmax-input-head8": MINMAX_INT4 | {"head_bits": 8, "float_zero_points": "input"},
        "auto-head8": MINMAX_INT4 | {"algorithm": "auto", "head_bits": 8, "float_zero_points": "split"},
    },
    "int8": {
        "default": {},
        "asym": RTN_INT8 | {"symmetric": False, "head_bits": 8},
        "sym": RTN_INT8 | {"symmetric": True, "head_bits": 8},
        "asym-b128": RTN_INT8 | {"symmetric": False, "head_bits": 8, "block_size": 128},
        "sym-b128": RTN_INT8 | {"symmetric": True, "head_bits": 8, "block_size": 128},
    },
}


def quality(precision: str, configs: dict[str, dict], ctx_len: int, stride: int, hf: bool) -> dict[str, dict]:
    """Perplexity over the ``qgraph eval`` text, its change relative to float32 and top-1 agreement with float32
    (and with HF transformers when ``hf``), per configuration (``qgraph.evaluation``; scores are cached)."""
    from qgraph.api import QEFFAutoModelForCausalLM
    from qgraph.evaluation import FLOAT32, hf_scores, qgraph_scores, text_tokens

    model = QEFFAutoModelForCausalLM.from_pretrained(str(smollm2_dir()), cache_dir=CACHE_DIR, verbose=False)
    tokens = text_tokens(model, None, None, ctx_len, stride)
    reference = qgraph_scores(model, tokens, "ort", FLOAT32, {}, verbose=False).scores
    hf_reference = hf_scores(model, tokens, verbose=False).scores if hf else None
    rows = {FLOAT32: {"perplexity": reference.perplexity, "source": tokens.source, "scored": reference.count}}
    scored: dict[str, object] = {}  # "default" is one of the spelled-out configurations: scored once
    for name, options in configs.items():
        resolved = json.dumps(QUANTIZATION_DEFAULTS[precision] | options, sort_keys=True)
        if resolved not in scored:
            compile_options = {"quantization": options} if options else {}
            scored[resolved] = qgraph_scores(model, tokens, "ort", precision, compile_options, verbose=False).scores
        scores = scored[resolved]
        rows[name] = {
            "perplexity": scores.perplexity,
            "relative_change": scores.perplexity / reference.perplexity - 1,
            "agreement_float32": scores.agreement(reference),
            "agreement_hf": scores.agreement(hf_reference) if hf_reference is not None else None,
        }
        print(f"{precision} {name}: perplexity {scores.perplexity:.3f}", file=sys.stderr)
    return rows


def speed(precision: str, configs: dict[str, dict], rounds: int, new_tokens: int) -> dict[str, dict]:
    """Decode ms/token at batch 1 (16-token prompt), decode tokens/s at batch 8 and the 128-token prompt's TTFT,
    configurations interleaved round by round; medians and the median per-round ratio to the first one."""
    from benchmarks.int4_vs_genai import qgraph_session_runner

    model_dir = smollm2_dir()
    prompts = {s: prompt_rows(model_dir, *SETTINGS[s]) for s in ("b1p16", "b1p128", "b8p16")}
    variants, weights = {}, {}
    for name, options in configs.items():
        # one batch-1 artifact (prefill chunk 128) serves both prompts: a 16-token prompt runs 16 columns
        one, counts = qgraph_session_runner(model_dir, CACHE_DIR, precision, options, new_tokens, 128, 1)
        eight, _ = qgraph_session_runner(model_dir, CACHE_DIR, precision, options, new_tokens, 16, 8)
        variants[name] = {"b1p16": one, "b1p128": one, "b8p16": eight}
        weights[name] = counts["weight_mib_after"]
    runs = measure(variants, prompts, rounds)
    first = next(iter(configs))
    rows = {}
    for name in configs:
        rows[name] = {"weight_mib": weights[name]}
        for setting, metric in SPEED_METRICS:
            values = [r[metric] for r in runs[name][setting]]
            ratios = [r[metric] / f[metric] for r, f in zip(runs[name][setting], runs[first][setting], strict=True)]
            rows[name][f"{setting}.{metric}"] = statistics.median(values)
            rows[name][f"{setting}.{metric}.ratio"] = statistics.median(ratios)
    return rows


SPEED_METRICS = (("b1p16", "decode_ms_per_token"), ("b8p16", "decode_tok_s"), ("b1p128", "ttft_ms"))


def markdown(result: dict) -> str:
    lines = [
        "# quantize-weights sweep: quality and speed of each configuration (SmolLM2-135M-Instruct)",
        "",
        f"Command: `{result['command']}`  ",
        run_header(result) + " (much above the benchmark's own threads means other work shared the cores; the x "
        "columns are per-round "
        "ratios to the precision's first row).  ",
        f"Perplexity: {result.get('quality_method', 'not measured')}.",
        "",
        "| precision | config | options | perplexity | vs float32 | top-1 = float32 | top-1 = HF | weights MiB "
        "| b1 p16 decode ms/token | b8 p16 decode tok/s | b1 p128 prefill ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for precision, rows in result["precisions"].items():
        float32 = rows["quality"].get("float32")
        if float32 and precision == next(iter(result["precisions"])):
            lines.append(f"| float32 | – | – | {float32['perplexity']:.3f} | – | – | – | – | – | – | – |")
        for name, options in rows["configs"].items():
            q = rows["quality"].get(name, {})
            s = rows["speed"].get(name, {})

            def cell(key: str, digits: int, s=s) -> str:
                if key not in s:
                    return "–"
                return f"{s[key]:.{digits}f} ({s[key + '.ratio']:.2f}x)"

            quality_cells = (
                [
                    f"{q['perplexity']:.3f}",
                    f"{100 * q['relative_change']:+.2f}%",
                    f"{100 * q['agreement_float32']:.1f}%",
                    f"{100 * q['agreement_hf']:.1f}%" if q["agreement_hf"] is not None else "–",
                ]
                if q
                else ["–"] * 4
            )
            lines.append(
                f"| {precision} | {name} | {json.dumps(options) if options else 'defaults'} | "
                + " | ".join(quality_cells)
                + f" | {s.get('weight_mib', '–')} | {cell('b1p16.decode_ms_per_token', 2)} | "
                f"{cell('b8p16.decode_tok_s', 1)} | {cell('b1p128.ttft_ms', 1)} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precisions", default="int4,int8")
    parser.add_argument("--configs", default=None, help="names from CONFIGS (default: all of each precision)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--ctx-len", type=int, default=512, help="perplexity windows (qgraph eval's default)")
    parser.add_argument("--stride", type=int, default=256)
    parser.add_argument("--skip", choices=("quality", "speed"), default=None)
    parser.add_argument("--hf", action="store_true", help="also top-1 agreement with HF transformers (slow)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "quant_sweep")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    chosen = args.configs.split(",") if args.configs else None
    result = {**run_record("benchmarks.quant_sweep", argv, os.getloadavg()), "precisions": {}}
    for precision in args.precisions.split(","):
        configs = {n: o for n, o in CONFIGS[precision].items() if chosen is None or n in chosen}
        rows = {"configs": configs, "quality": {}, "speed": {}}
        if args.skip != "quality":
            rows["quality"] = quality(precision, configs, args.ctx_len, args.stride, args.hf)
            result["quality_method"] = (
                f"`qgraph.evaluation` over {rows['quality']['float32']['source']}, windows of {args.ctx_len} tokens "
                f"every {args.stride} ({rows['quality']['float32']['scored']} tokens scored)"
            )
        if args.skip != "speed":
            rows["speed"] = speed(precision, configs, args.rounds, args.new_tokens)
        result["precisions"][precision] = rows
    result["load_end"] = os.getloadavg()
    write_results(args.out, result, markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

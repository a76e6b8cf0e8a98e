"""Peak memory of a generate process with the model already compiled: qgraph vs onnxruntime-genai, same run.

    python -m benchmarks.memory [--precisions float32,int4] [--rounds 3]

Each measured process starts fresh, loads SmolLM2-135M-Instruct from the cache the way a user's second run does
(qgraph: ``from_pretrained`` + ``compile`` finding the cached artifact + ``generate``; genai: ``og.Model`` on the
model builder's output), tokenizes the chat-templated question, generates greedily until EOS or 64 tokens, and
reports its whole-life peak RSS (VmHWM). qgraph's tokenizer is ``qgraph.load_tokenizer`` (the checkpoint's
tokenizer.json through the ``tokenizers`` library, as genai uses its own), and in a third row transformers'
``PreTrainedTokenizerFast`` (what ``AutoTokenizer`` returns for SmolLM2, minus AutoTokenizer's import of torch).
A first, unmeasured process of each compiles or builds. Rounds alternate the three; medians are reported with the
ratio to genai. Writes ``benchmarks/results/memory.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

QUESTION = "What is the capital of France?"
MAX_NEW_TOKENS, CTX_LEN, PREFILL = 64, 256, 16
GENAI_PRECISION = {"float32": "fp32", "int4": "int4"}


def _peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _chat_prompt(model_dir: str) -> str:
    template = (Path(model_dir) / "chat_template.jinja").read_text()
    import jinja2

    return jinja2.Template(template).render(
        messages=[{"role": "user", "content": QUESTION}], add_generation_prompt=True, bos_token="", eos_token=""
    )


def qgraph_child(model_dir: str, cache_dir: str, precision: str, hf_tokenizer: bool = False) -> dict:
    from qgraph import QEFFAutoModelForCausalLM, load_tokenizer

    if hf_tokenizer:
        from transformers import PreTrainedTokenizerFast

        tokenizer = PreTrainedTokenizerFast.from_pretrained(model_dir)
    else:
        tokenizer = load_tokenizer(model_dir)
    model = QEFFAutoModelForCausalLM.from_pretrained(model_dir, cache_dir=cache_dir, verbose=False)
    model.compile(prefill_seq_len=PREFILL, ctx_len=CTX_LEN, precision=precision)
    result = model.generate(tokenizer, [_chat_prompt(model_dir)], generation_len=MAX_NEW_TOKENS, verbose=False)
    return {
        "text": result.generated_texts[0],
        "tokens": len(result.generated_ids[0]),
        "reused": model.artifact.reused,
        "torch_imported": "torch" in sys.modules,
    }


def qgraph_hf_tokenizer_child(model_dir: str, cache_dir: str, precision: str) -> dict:
    return qgraph_child(model_dir, cache_dir, precision, hf_tokenizer=True)


def genai_child(model_dir: str, cache_dir: str, precision: str) -> dict:
    import onnxruntime_genai as og

    out = Path(cache_dir) / "bench" / f"genai-smollm2-{GENAI_PRECISION[precision]}"
    sys.path.insert(0, str(Path(__file__).parent / "runners"))
    from run_genai import build

    build({"model_dir": model_dir, "genai_precision": GENAI_PRECISION[precision]}, out)
    config_path = out / "genai_config.json"
    config = json.loads(config_path.read_text())
    config["model"]["decoder"]["session_options"]["intra_op_num_threads"] = 2
    config_path.write_text(json.dumps(config, indent=2))
    model = og.Model(str(out))
    tokenizer = og.Tokenizer(model)
    ids = tokenizer.encode(_chat_prompt(model_dir))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + MAX_NEW_TOKENS, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(ids)
    new = []
    while not generator.is_done():
        generator.generate_next_token()
        new.append(int(generator.get_next_tokens()[0]))
    return {"text": tokenizer.decode(new), "tokens": len(new), "reused": True, "torch_imported": "torch" in sys.modules}


PEER_LABELS = {
    "qgraph": "qgraph, qgraph.load_tokenizer",
    "qgraph-hf-tokenizer": "qgraph, transformers PreTrainedTokenizerFast",
    "genai": "onnxruntime-genai 0.18",
}
CHILDREN = {"qgraph": qgraph_child, "genai": genai_child, "qgraph-hf-tokenizer": qgraph_hf_tokenizer_child}


def _run_child(peer: str, model_dir: Path, cache_dir: Path, precision: str) -> dict:
    command = [sys.executable, "-m", "benchmarks.memory", "--child", peer, str(model_dir), str(cache_dir), precision]
    done = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    if done.returncode != 0:
        raise RuntimeError(f"{peer} {precision} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--precisions", default="float32,int4")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        peer, model_dir, cache_dir, precision = args.child
        result = CHILDREN[peer](model_dir, cache_dir, precision)
        print(json.dumps(result | {"peak_rss_mib": _peak_rss_mib()}))
        return 0

    from benchmarks.models import smollm2_dir
    from benchmarks.report import write_results
    from qgraph.cache import DEFAULT_CACHE_DIR

    model_dir = smollm2_dir()
    rows = []
    for precision in args.precisions.split(","):
        for peer in CHILDREN:  # compile / build once, unmeasured
            _run_child(peer, model_dir, DEFAULT_CACHE_DIR, precision)
        peaks: dict[str, list[float]] = {peer: [] for peer in CHILDREN}
        last: dict[str, dict] = {}
        for _ in range(args.rounds):
            for peer in CHILDREN:
                last[peer] = _run_child(peer, model_dir, DEFAULT_CACHE_DIR, precision)
                peaks[peer].append(last[peer]["peak_rss_mib"])
        medians = {peer: statistics.median(values) for peer, values in peaks.items()}
        rows.append(
            {
                "precision": precision,
                "peaks_mib": peaks,
                "median_mib": medians,
                "ratio": medians["qgraph"] / medians["genai"],
                "ratio_hf_tokenizer": medians["qgraph-hf-tokenizer"] / medians["genai"],
                "runs": last,
            }
        )
    report = {
        "command": "python -m benchmarks.memory",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}",
        "rows": rows,
    }
    write_results("memory", report, _markdown(report))
    return 0


def _markdown(r: dict) -> str:
    lines = [
        "# Peak RSS of a generate process, artifact cached: qgraph vs onnxruntime-genai",
        "",
        f"Command: `{r['command']}`  ",
        f"Date: {r['date']}; machine: {r['machine']}.  ",
        f"SmolLM2-135M-Instruct, chat-templated {QUESTION!r}, greedy until EOS or {MAX_NEW_TOKENS} tokens; "
        "each number is one fresh process's VmHWM; median of the rounds (qgraph and genai alternate).",
        "",
        "| precision | process | peak RSS MiB, median (runs) | / onnxruntime-genai | imported torch |",
        "|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        genai = row["median_mib"]["genai"]
        for peer, label in PEER_LABELS.items():
            runs = ", ".join(f"{v:.0f}" for v in row["peaks_mib"][peer])
            torch_imported = "yes" if row["runs"][peer]["torch_imported"] else "no"
            lines.append(
                f"| {row['precision']} | {label} | {row['median_mib'][peer]:.0f} ({runs}) | "
                f"{row['median_mib'][peer] / genai:.2f}x | {torch_imported} |"
            )
    lines += ["", "Answers (last round):", ""]
    for row in r["rows"]:
        for peer, run in row["runs"].items():
            lines.append(f"- {row['precision']} {peer}: {run['text']!r} ({run['tokens']} tokens)")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())

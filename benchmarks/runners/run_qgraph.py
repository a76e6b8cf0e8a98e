"""qgraph through its public API: ``QEFFAutoModelForCausalLM.from_pretrained`` -> ``compile`` -> greedy runtime.

The timed loop is qgraph's own runtime (``greedy_generate``, the loop ``generate`` runs) over the compiled session,
fed the job's token ids and with no EOS stop so every peer generates the same number of tokens.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import main, measure, now  # noqa: E402


def weight_bytes_per_token(onnx_path: Path) -> int:
    """Bytes of initializers a decode step reads: all of them except tables only gathered from (one row each)."""
    import onnx_ir as ir

    model = ir.load(onnx_path)  # external data stays on disk: sizes come from shapes and dtypes
    total = 0
    for value in model.graph.initializers.values():
        uses = list(value.uses())
        if uses and all(u.node.op_type == "Gather" and u.idx == 0 for u in uses):
            continue
        total += value.const_value.nbytes if value.const_value is not None else 0
    return total


def body(job: dict) -> dict:
    import onnxruntime

    import qgraph
    from qgraph.api import QEFFAutoModelForCausalLM
    from qgraph.runtime import greedy_generate

    rows = job["prompt_ids"]
    options = dict(job.get("compile", {}))
    cache_dir = Path(job["cache_dir"])
    t0 = now()
    model = QEFFAutoModelForCausalLM.from_pretrained(job["model_dir"], cache_dir=cache_dir, verbose=False)
    load_s = now() - t0
    t0 = now()
    model.export()
    export_s = now() - t0
    t0 = now()
    model.compile(
        prefill_seq_len=job["prefill_seq_len"],
        ctx_len=job["ctx_len"],
        batch_size=len(rows),
        **options,
    )
    compile_s = now() - t0
    session = model.artifact.load()

    def generate():
        start = now()
        tokens, stats, _ = greedy_generate(
            session, rows, batch_size=len(rows), generation_len=job["new_tokens"], eos_token_ids=set(), start_time=start
        )
        return start, start + stats.ttft_s, start + stats.e2e_s, tokens

    result = measure(job, generate)
    passes = [{"name": r["name"], "counts": r["counts"]} for r in model.artifact.reports]
    return result | {
        "load_s": load_s,
        "export_s": export_s,
        "compile_s": compile_s,
        "export_reused": export_s < 1.0,
        "compile_reused": model.artifact.reused,
        "passes": passes,
        "versions": {"qgraph": qgraph.__version__, "onnxruntime": onnxruntime.__version__},
        "weight_bytes": weight_bytes_per_token(model.artifact.onnx_path),
    }


if __name__ == "__main__":
    main("qgraph", body)

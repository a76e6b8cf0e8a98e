"""The README's support matrix, generated from a run of the architecture parity tests (never written by hand).

``python -m tests.support_matrix`` runs ``tests/test_architectures.py`` (every architecture, slow ones included),
which records what happened to each architecture in a JSON file: whether it exported, which passes ran with their
counts, whether greedy tokens matched HF transformers per backend, or at which stage and with which message it
failed. This module renders that record as ``docs/support_matrix.md``.

``--from-json FILE`` renders an existing record without running the tests again.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OUTPUT = ROOT / "docs" / "support_matrix.md"
RECORD_ENV = "QGRAPH_SUPPORT_MATRIX_JSON"  # where test_architectures.py writes its record, when set

# -- what the tests record ------------------------------------------------------------------------------------------


def describe(model, kv_heads: int, takes_positions: bool = True) -> list[str]:
    """Facts about an HF model that say which general mechanism it exercises (for the matrix; read, never used)."""
    config = model.config.get_text_config()
    facts = []
    heads = getattr(config, "num_attention_heads", None)
    if heads == kv_heads:
        facts.append("multi-head")
    elif kv_heads == 1:
        facts.append("multi-query")
    elif heads:
        facts.append(f"grouped-query {heads}:{kv_heads}")
    modules = {type(m).__name__ for m in model.modules()}
    if getattr(config, "alibi", False) or not takes_positions:
        facts.append("ALiBi")
    elif any("Rotary" in name for name in modules):
        rope = getattr(config, "rope_parameters", None) or {}
        kind = rope.get("rope_type", "default") if isinstance(rope, dict) else "default"
        partial = rope.get("partial_rotary_factor") if isinstance(rope, dict) else None
        partial = partial or getattr(config, "rotary_pct", None)
        if getattr(config, "rotary_dim", None):
            partial = config.rotary_dim / (config.hidden_size // heads)
        detail = [kind] if kind != "default" else []
        if partial and partial < 1:
            detail.append(f"partial {partial:g}")
        facts.append("rotary" + (f" ({', '.join(detail)})" if detail else ""))
    if any(getattr(config, k, None) for k in ("attn_logit_softcapping", "final_logit_softcapping")):
        facts.append("logit soft-capping")
    if any(getattr(config, k, None) for k in ("parallel_attn", "use_parallel_residual")):
        facts.append("parallel attention/MLP")
    if any(getattr(config, k, None) for k in ("num_local_experts", "num_experts")):
        facts.append("mixture of experts")
    if not takes_positions:
        facts.append("no position_ids in forward")
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    if out is not None and inp is not None:
        tied = out.weight.data_ptr() == inp.weight.data_ptr()
        facts.append("tied embeddings" if tied else "untied embeddings")
    return facts


def record(results: dict[str, Any]) -> None:
    """Write the tests' record where ``RECORD_ENV`` says (no-op when it is unset)."""
    path = os.environ.get(RECORD_ENV)
    if path:
        Path(path).write_text(json.dumps(results, indent=2, sort_keys=True))


# -- rendering -------------------------------------------------------------------------------------------------------


def _counts(passes: list[dict[str, Any]]) -> str:
    parts = []
    for report in passes:
        counts = ", ".join(f"{k}={v}" for k, v in report["counts"].items() if v)
        parts.append(f"`{report['name']}`" + (f" ({counts})" if counts else ""))
    return "<br>".join(parts)


def _parity(row: dict[str, Any], backend: str) -> str:
    cases = row.get("parity", {}).get(backend)
    if not cases:
        return "not run"
    if all(cases.values()):
        return "yes"
    return "NO: " + ", ".join(case for case, ok in cases.items() if not ok)


GROUPS = {
    "required": "Architectures the issue requires",
    "extra": "Also supported (what transformers ships that came for free)",
    "unsupported": "Not supported",
}


def _mechanisms(row: dict[str, Any]) -> list[str]:
    """What the KV pass measured and rebuilt, from its counts."""
    counts = next((r["counts"] for r in row.get("passes", []) if r["name"] == "kv-retained-state"), {})
    found = []
    if counts.get("windowed_masks"):
        window = f" {counts['window']}" if "window" in counts else ""
        found.append(f"sliding window{window} ({counts['windowed_masks']} of {counts['masks_rebuilt']} masks)")
    if counts.get("key_biases"):
        found.append("per-key bias kept from attention_mask")
    if counts.get("shape_masks"):
        found.append(f"{counts['shape_masks']} masks built from shapes")
    return found


def render(results: dict[str, Any]) -> str:
    backends = sorted({b for row in results.values() for b in row.get("parity", {})}, key=lambda b: (b != "ort", b))
    backends = backends or ["ort"]
    head = ["architecture", "HF class", "exercises", "export", "passes applied (counts)"]
    head += [f"parity `{b}`" for b in backends]
    lines = [
        "# Support matrix",
        "",
        "Generated by `python -m tests.support_matrix` from a run of `tests/test_architectures.py`; do not edit by "
        "hand.",
        "Each architecture is a tiny seeded random model (2 layers, hidden 64) built from its transformers config. "
        "Parity: qgraph's greedy tokens equal transformers' `generate(do_sample=False)` for the prompt "
        '"My name is" (batch 1) and a two-prompt batch of different lengths (the long one prefilled in two chunks), '
        "24 new tokens, ctx_len 64. `ai100` runs the Cloud AI 100 bundle's graph on ONNX Runtime.",
    ]
    failed = []
    for group, title in GROUPS.items():
        archs = sorted(a for a, row in results.items() if row.get("group") == group)
        if not archs:
            continue
        lines += ["", f"## {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for arch in archs:
            row = results[arch]
            if row.get("error"):
                failed.append((arch, row))
            export = "yes" if row.get("export") == "ok" else "no"
            passes = _counts(row.get("passes", [])) or (f"failed at {row['stage']}" if row.get("stage") else "")
            cells = [
                f"`{arch}`",
                row.get("hf_class", ""),
                ", ".join(row.get("features", []) + _mechanisms(row)),
                export + (f" ({row['export_s']:.1f} s)" if row.get("export_s") else ""),
                passes,
            ]
            cells += [_parity(row, b) if not row.get("error") else "no" for b in backends]
            lines.append("| " + " | ".join(cells) + " |")
    if failed:
        lines += ["", "### Why", ""]
        for arch, row in failed:
            lines.append(f"- `{arch}` ({row.get('hf_class', '')}) fails at **{row['stage']}**: {row['error']}")
    passing = sum(1 for r in results.values() if not r.get("error") and _all_parity(r))
    lines += ["", f"{passing} of {len(results)} architectures pass.", ""]
    return "\n".join(lines)


def _all_parity(row: dict[str, Any]) -> bool:
    cases = [ok for per_backend in row.get("parity", {}).values() for ok in per_backend.values()]
    return bool(cases) and all(cases)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from-json", type=Path, help="render this record instead of running the tests")
    parser.add_argument("--output", type=Path, default=OUTPUT)
    parser.add_argument("--json-out", type=Path, help="also keep the test record here")
    args = parser.parse_args(argv)
    if args.from_json:
        results = json.loads(args.from_json.read_text())
        status = 0
    else:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "record.json"
            env = dict(os.environ, **{RECORD_ENV: str(path)}, HF_HUB_OFFLINE="1")
            command = [sys.executable, "-m", "pytest", "-q", "-m", "", str(ROOT / "tests" / "test_architectures.py")]
            status = subprocess.run(command, cwd=ROOT, env=env).returncode
            if not path.exists():
                print("the test run wrote no record", file=sys.stderr)
                return status or 1
            results = json.loads(path.read_text())
            if args.json_out:
                args.json_out.write_text(path.read_text())
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(render(results))
    print(f"wrote {args.output} ({len(results)} architectures; test run exit status {status})")
    return status


if __name__ == "__main__":
    sys.exit(main())

"""What each 4-bit grid costs SmolLM2 in perplexity: why the int4 default needs float zero points on these weights.

    python -m benchmarks.int4_grid [--tokens 4096] [--calibration-tokens 4096]

SmolLM2's offline float32 weights are dequantized Q4_1 (every linear block of 32 is ``min + d * q``, ``q`` in 0..15,
with ``min / d`` not an integer). ONNX Runtime's fast CPU kernel (MatMulNBits with a uint8 zero point) multiplies by
``scale * (q - z)`` with ``z`` an integer: a grid of multiples of ``scale``, which always contains 0 and so cannot hold
``min + d * q`` for every ``q``. This benchmark measures, without compiling anything, what each way of living with
that costs in perplexity: fake quantization in HF transformers, every ``nn.Linear`` weight (the LM head untied from
the embedding, which stays float32 as in a compiled graph) replaced by the float weight its 4-bit blocks stand for,
the numbers MatMulNBits multiplies by. Rows:

- ``minmax``: qgraph's float-zero-point blocks (``QuantizeWeights(algorithm="minmax")``), the exact Q4_1 grid here;
  what the int4 default computes (its ``split`` adds blocksum(x) @ R to the integer kernel);
- ``rtn``: ONNX Runtime's own round-to-nearest blocks with integer zero points (``algorithm="rtn"``), everywhere and
  in one group of projections at a time (the rest ``minmax``): which projections need the exact grid;
- ``rtn, scales x f``: integer zero points with each block's scale widened by ``f`` (a scale search): the error is
  the grid's offset, not where rounding falls, so moving the grid does not help;
- ``gptq (...)``: integer zero points chosen with error feedback (GPTQ, blocks of 32 along K in order, dampening
  1% of the mean diagonal), from each projection's input second moments ``E[x x^T]`` over calibration tokens of the
  float model: other Debian licence texts (LGPL-2.1, Artistic, BSD, MPL-1.1: the evaluation text's own domain),
  Python's documentation (``pydoc_data.topics``, shipped with CPython: another domain), or text the float model
  samples itself (temperature 1, from its BOS token: data-free).

Perplexity over the first ``--tokens`` tokens of ``qgraph eval``'s default text with its windows (512 every 256),
scored by ``qgraph.perplexity``. Writes ``benchmarks/results/int4_grid.{json,md}``.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from benchmarks.models import smollm2_dir
from benchmarks.report import RESULTS_DIR, run_header, run_record, write_results
from qgraph.eval_text import COMMON_LICENSES_DIR, common_licenses_text
from qgraph.evaluation import score_torch_model
from qgraph.perplexity import DEFAULT_CTX_LEN, DEFAULT_STRIDE, strided_windows

GROUPS = {
    "q/k/v": ("q_proj", "k_proj", "v_proj"),
    "o": ("o_proj",),
    "gate/up": ("gate_proj", "up_proj"),
    "down": ("down_proj",),
    "head": ("lm_head",),
}
CALIBRATION_LICENSES = ("LGPL-2.1", "Artistic", "BSD", "MPL-1.1")  # none of them is in the evaluation text
WINDOW = 512  # calibration tokens per forward pass
Weights = dict[str, np.ndarray]  # linear name -> [K, N] float32 (MatMul orientation)


def perplexity(model, token_ids: list[int]) -> float:
    """``qgraph eval``'s strided windows over ``token_ids``, scored from the model's logits
    (``qgraph.evaluation.score_torch_model``, what scores the HF reference)."""
    ids = np.asarray(token_ids, dtype=np.int64)
    windows = strided_windows(len(ids), DEFAULT_CTX_LEN, DEFAULT_STRIDE)
    return score_torch_model(model, ids, windows).perplexity


def linears(model) -> dict:
    import torch

    return {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def set_weights(model, weights: Weights) -> None:
    import torch

    for name, module in linears(model).items():
        module.weight.data = torch.from_numpy(np.ascontiguousarray(weights[name].T))


def second_moments(model, token_ids: list[int]) -> Weights:
    """``E[x x^T]`` ([K, K], float64) of every linear's input over ``token_ids`` (windows of ``WINDOW``)."""
    import torch

    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name: str):
        def record(module, inputs, output) -> None:
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + x.T @ x
            counts[name] = counts.get(name, 0) + x.shape[0]

        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in linears(model).items()]
    try:
        for begin in range(0, len(token_ids), WINDOW):
            with torch.no_grad():
                model(torch.tensor([token_ids[begin : begin + WINDOW]]))
    finally:
        for handle in handles:
            handle.remove()
    return {name: (sums[name] / counts[name]).numpy() for name in sums}


def gptq_blocks(w_kn: np.ndarray, moments: np.ndarray, block: int = 32, damp: float = 0.01) -> np.ndarray:
    """``w_kn`` on 4-bit blocks of ``block`` rows with integer zero points, rows quantized in order and each one's
    error pushed onto the rows not yet quantized through the inverse of ``moments`` (GPTQ); returns the dequantized
    ``[K, N]`` weight. A block's scale and zero point are its min/max when its first row is reached."""
    w = w_kn.astype(np.float64)
    k = w.shape[0]
    h = moments.copy()
    h[np.diag(h) == 0, np.diag(h) == 0] = 1.0  # an input that is always zero: any value of its row does
    h += damp * np.mean(np.diag(h)) * np.eye(k)
    inverse = np.linalg.inv(h)
    u = np.linalg.cholesky(inverse).T  # upper: inverse = u.T @ u
    out = np.empty_like(w)
    for start in range(0, k, block):
        stop = min(start + block, k)
        low, high = w[start:stop].min(0), w[start:stop].max(0)
        scale = (high - low) / 15
        scale[scale == 0] = 1.0
        zero = np.clip(np.rint(-low / scale), 0, 15)
        errors = np.empty((stop - start, w.shape[1]))
        for row in range(start, stop):
            q = np.clip(np.rint(w[row] / scale) + zero, 0, 15)
            out[row] = scale * (q - zero)
            errors[row - start] = (w[row] - out[row]) / u[row, row]
            w[row + 1 : stop] -= np.outer(u[row, row + 1 : stop], errors[row - start])
        w[stop:] -= u[start:stop, stop:].T @ errors
    return out.astype(np.float32)


def calibration_texts(tokenizer, model, count: int, seed: int) -> dict[str, list[int]]:
    """Token ids of each calibration source, ``count`` tokens each (spread over the source)."""
    import pydoc_data.topics

    import torch

    def spread(ids: list[int]) -> list[int]:
        chunks = max(count // WINDOW, 1)
        step = max((len(ids) - WINDOW) // chunks, 0)
        return [t for i in range(chunks) for t in ids[i * step : i * step + WINDOW]][:count]

    licences = "\n\n".join((COMMON_LICENSES_DIR / n).read_text(encoding="utf-8") for n in CALIBRATION_LICENSES)
    python_docs = "\n\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))
    torch.manual_seed(seed)
    rows = max(count // WINDOW, 1)
    start = torch.full((rows, 1), tokenizer.bos_token_id if tokenizer.bos_token_id is not None else 0)
    with torch.no_grad():
        sampled = model.generate(
            start,
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            max_new_tokens=WINDOW - 1,
            min_new_tokens=WINDOW - 1,
            pad_token_id=0,
        )
    return {
        "other licence texts": spread(tokenizer(licences)["input_ids"]),
        "Python's documentation": spread(tokenizer(python_docs)["input_ids"]),
        "sampled from the float model": sampled.reshape(-1).tolist()[:count],
    }


def rtn_scaled(w_kn: np.ndarray, factor: float, block: int = 32) -> np.ndarray:
    """Integer-zero-point 4-bit blocks with the min/max scale widened by ``factor``."""
    k, n = w_kn.shape
    w = w_kn.T.reshape(n, k // block, block)
    low, high = w.min(-1, keepdims=True), w.max(-1, keepdims=True)
    scale = (high - low) / 15 * factor
    scale[scale == 0] = 1.0
    zero = np.clip(np.rint(-low / scale), 0, 15)
    q = np.clip(np.rint(w / scale) + zero, 0, 15)
    return (scale * (q - zero)).reshape(n, k).T.astype(np.float32)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096, help="evaluation tokens (from the start of the text)")
    parser.add_argument("--calibration-tokens", type=int, default=4096)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "int4_grid")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qgraph.passes.quantize_weights import QuantizeWeights

    load_start = os.getloadavg()
    model_dir = smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())  # its own copy: untied
    text = common_licenses_text()
    eval_ids = tokenizer(text.text)["input_ids"][: args.tokens]
    original: Weights = {n: m.weight.detach().numpy().T.copy() for n, m in linears(model).items()}
    quantizer = QuantizeWeights(bits=4, head_bits=4)
    minmax = {n: quantizer._quantize_min_max(w).dequantized(w.shape[0]) for n, w in original.items()}
    rtn = {n: quantizer._quantize_rtn(w, 4, False).dequantized(w.shape[0]) for n, w in original.items()}

    rows: list[dict] = []

    def score(name: str, weights: Weights | Callable[[str], np.ndarray]) -> None:
        began = time.perf_counter()
        chosen = weights if isinstance(weights, dict) else {n: weights(n) for n in original}
        set_weights(model, chosen)
        value = perplexity(model, eval_ids)
        rows.append({"weights": name, "perplexity": value})
        print(f"{name}: {value:.3f} ({time.perf_counter() - began:.0f} s)", flush=True)

    score("float32", original)
    score("minmax everywhere (exact Q4_1 grid; the int4 default)", minmax)
    score("rtn everywhere (integer zero points)", rtn)
    for group, suffixes in GROUPS.items():
        score(f"minmax, {group} rtn", lambda n, s=suffixes: rtn[n] if n.endswith(s) else minmax[n])
    for factor in (1.03, 15 / 14):
        score(f"rtn, scales x{factor:.3f}", lambda n, f=factor: rtn_scaled(original[n], f))
    set_weights(model, original)
    sources = calibration_texts(tokenizer, model, args.calibration_tokens, seed=0)
    for source, ids in sources.items():
        set_weights(model, original)
        moments = second_moments(model, ids)
        gptq = {n: gptq_blocks(w, moments[n]) for n, w in original.items()}
        score(f"gptq, calibrated on {source}", gptq)
        score(
            f"gptq, calibrated on {source}; q/k/v minmax",
            lambda n, g=gptq: minmax[n] if n.endswith(GROUPS["q/k/v"]) else g[n],
        )

    base = rows[0]["perplexity"]
    for row in rows:
        row["change_pct"] = 100 * (row["perplexity"] / base - 1)
    result = {
        **run_record("benchmarks.int4_grid", argv, load_start),
        "text": text.source,
        "eval_tokens": len(eval_ids),
        "calibration_tokens": args.calibration_tokens,
        "rows": rows,
    }
    lines = [
        "# What each 4-bit grid costs SmolLM2 (fake quantization in HF transformers)",
        "",
        f"Command: `{result['command']}`  ",
        run_header(result) + "  ",
        f"Text: the first {len(eval_ids)} tokens of {text.source}; windows of {DEFAULT_CTX_LEN} every "
        f"{DEFAULT_STRIDE}. Calibration: {args.calibration_tokens} tokens per source. Every linear weight 4-bit in "
        "blocks of 32 along K (LM head untied and 4-bit; embedding float32).",
        "",
        "| weights | perplexity | change vs float32 |",
        "|---|---|---|",
        *(f"| {r['weights']} | {r['perplexity']:.3f} | {r['change_pct']:+.1f}% |" for r in rows),
        "",
    ]
    write_results(args.out, result, "\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

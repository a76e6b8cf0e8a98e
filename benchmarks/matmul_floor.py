"""How close ONNX Runtime's own weight MatMuls come to the bandwidth floor, next to a full qgraph decode step.

Why: the harness reports every decode as a ratio to ``weight bytes / read bandwidth``. This splits that ratio: a graph
of only the compiled model's weight products (same weights, same shapes, batch 1, one token) shows what ORT's GEMV
kernels reach on this machine, so the rest of a step's distance to the floor is everything else the graph does.

    python -m benchmarks.matmul_floor --model smollm2     # or gpt2; ~1 min after the model is cached

Prints the machine's read bandwidth, the weight bytes, the floor, the MatMul-only time and a full decode step (qgraph
runtime, 64 tokens after a 16-token prompt), each with its ratio to the floor. Medians of ``--repeats`` runs.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir

from qgraph.graph_utils import initializer_value

WEIGHT_PRODUCTS = {("", "MatMul"), ("", "Gemm"), ("com.microsoft", "MatMulNBits")}


def _constant(value: ir.Value | None) -> np.ndarray | None:
    """A weight's values: an initializer, or ``Transpose`` of one (a tied LM head; ORT folds it at load)."""
    if value is None:
        return None
    if value.const_value is not None:
        return value.const_value.numpy()
    node = value.producer()
    if node is not None and node.op_type == "Transpose" and node.inputs[0].const_value is not None:
        perm = node.attributes.get_ints("perm", None)
        return np.transpose(node.inputs[0].const_value.numpy(), perm)
    return None


def _weight_products(model: ir.Model) -> list[ir.Node]:
    """Nodes that multiply an activation by a constant weight (the bytes a decode step must read)."""
    found = []
    for node in model.graph:
        domain = "" if node.domain == "ai.onnx" else node.domain
        if (domain, node.op_type) in WEIGHT_PRODUCTS and len(node.inputs) > 1 and _constant(node.inputs[1]) is not None:
            found.append(node)
    return found


def matmul_only_graph(model: ir.Model) -> tuple[ir.Model, int, dict[str, int]]:
    """A graph of ``model``'s weight products alone, each reading a ``[1, K]`` input; (graph, weight bytes, inputs)."""
    inputs: dict[int, ir.Value] = {}
    weights: dict[int, ir.Value] = {}  # the model's weight values -> copies owned by the new graph (same tensors)
    nodes, outputs = [], []
    for node in _weight_products(model):
        a = node.inputs[0]
        k = a.shape[-1] if a.shape is not None and isinstance(a.shape[-1], int) else None
        if k is None:
            continue
        if k not in inputs:
            inputs[k] = ir.Value(name=f"x{k}", shape=ir.Shape([1, k]), type=a.type)
        operands = [inputs[k]]
        for index, value in enumerate(node.inputs[1:], start=1):
            array = _constant(value)
            if array is not None:
                if id(value) not in weights:
                    name = value.name or f"{node.name}_input{index}"
                    weights[id(value)] = initializer_value(name, np.ascontiguousarray(array))
                value = weights[id(value)]
            operands.append(value)
        product = ir.Node(node.domain, node.op_type, operands, list(node.attributes.values()), name=node.name)
        outputs.append(product.outputs[0])
        product.outputs[0].name = f"y{len(outputs)}"
        product.outputs[0].type = node.outputs[0].type
        nodes.append(product)
    weight_bytes = sum(v.const_value.nbytes for v in weights.values())
    graph = ir.Graph(
        list(inputs.values()),
        outputs,
        nodes=nodes,
        initializers=list(weights.values()),
        opset_imports=dict(model.opset_imports),
        name="weight_products",
    )
    model_out = ir.Model(graph, ir_version=model.ir_version)
    return model_out, weight_bytes, {v.name: k for k, v in inputs.items()}


def _median_ms(fn, repeats: int, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1000)
    return statistics.median(samples)


def main(argv: list[str] | None = None) -> int:
    import onnxruntime as ort

    from benchmarks.bandwidth import read_bandwidth_gbs
    from benchmarks.models import MODELS
    from qgraph.api import QEFFAutoModelForCausalLM
    from qgraph.runtime import greedy_generate

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="smollm2")
    parser.add_argument("--precision", default="float32")
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args(argv)

    qg = QEFFAutoModelForCausalLM.from_pretrained(str(MODELS[args.model]()), verbose=False)
    qg.compile(prefill_seq_len=128, ctx_len=256, precision=args.precision)
    compiled = ir.load(qg.artifact.onnx_path)
    products, weight_bytes, input_widths = matmul_only_graph(compiled)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "weight_products.onnx"
        ir.save(products, path, external_data="weight_products.onnx.data")
        options = ort.SessionOptions()
        options.intra_op_num_threads = 2
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        feeds = {name: np.ones((1, k), np.float32) for name, k in input_widths.items()}
        matmul_ms = _median_ms(lambda: session.run(None, feeds), args.repeats)
    decoder = qg.artifact.load()
    prompt = [np.random.default_rng(16).integers(100, 1000, 16).tolist()]
    steps = []
    for _ in range(max(3, args.repeats // 10)):
        _, stats, _ = greedy_generate(decoder, prompt, 1, 64, set())
        steps.append(stats.decode_s * 1000 / stats.decode_tokens)
    step_ms = statistics.median(steps)
    bandwidth = read_bandwidth_gbs()["read_gbs"]
    floor_ms = weight_bytes / bandwidth / 1e6
    print(f"model {args.model} {args.precision}: {len(products.graph)} weight products, {weight_bytes / 1e6:.0f} MB")
    print(f"read bandwidth {bandwidth:.1f} GB/s -> floor {floor_ms:.2f} ms/token")
    print(f"weight products alone: {matmul_ms:.2f} ms ({matmul_ms / floor_ms:.2f}x floor)")
    extra = step_ms - matmul_ms
    print(f"full decode step:      {step_ms:.2f} ms ({step_ms / floor_ms:.2f}x floor; {extra:.2f} ms more)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

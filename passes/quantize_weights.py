"""Weight-only blockwise quantization of every constant-weight MatMul/Gemm into ONNX Runtime's ``MatMulNBits``.

Why: batch-1 decode reads every weight once per token, so on a memory-bound CPU it runs at ``weight bytes /
bandwidth``. 4-bit blocks (plus one scale and zero point per block) cut the bytes ~7x, 8-bit ~3.8x. Activations stay
float32; with ``accuracy_level=4`` ORT computes the product in int8 blocks (VNNI / AMX where the CPU has them).

The weights are quantized by ONNX Runtime's own code (``DefaultWeightOnlyQuantizer.qbits_block_quant``, the C++
``quantize_matmul_{4,8}bits`` kernels its ``MatMulNBitsQuantizer`` uses), applied here on the in-memory IR so no
protobuf round trip of the whole model is needed. Matched forms (``W`` a float32 initializer):

- ``MatMul(A, W)`` with ``W`` ``[K, N]``;
- ``MatMul(A, Transpose(W))`` with ``W`` ``[N, K]`` -- the tied LM head of GPT-2 / SmolLM2 (the embedding table
  stays for the ``Gather``; only the head reads the quantized copy);
- ``Gemm(A, W, C)`` with ``alpha = beta = 1``, ``transA = 0``, either ``transB``, ``C`` a 1-D bias (bias becomes
  ``MatMulNBits``'s bias input).

The LM head (the MatMul that ``logits`` is computed from) gets ``head_bits`` (8 by default), as llama.cpp's own
files keep ``token_embd``/``output`` at Q8_0 while the blocks are 4-bit: on SmolLM2 a 4-bit head moves the logits by
half their range, an 8-bit one by ~4%.

Embedding tables (``Gather`` from a float32 ``[V, H]`` initializer) become ``com.microsoft.GatherBlockQuantized``
8-bit blocks with ``embedding_bits=8`` (default ``None``: they stay float32). This shrinks the artifact on disk
(SmolLM2 int4: 205 -> 129 MB) but not the memory of a running session: ONNX Runtime maps external data, and a
gather touches only the pages of the rows it reads. (Sharing the 8-bit blocks of a tied LM head with the gather was
measured to cost memory: the head's original blocks then stay resident beside their pre-packed copy.)

``float_zero_points=True`` stores 4-bit asymmetric blocks the way llama.cpp's Q4_1 does, ``w = scale * q + min`` with
the block's own min/max, as MatMulNBits's float zero point ``-min / scale`` (ORT's integer zero point has to round
``min`` onto the scale grid). On weights that came from a Q4_1 file (SmolLM2 here) it reproduces them exactly, but
ONNX Runtime 1.32's CPU kernel has no fast path for float zero points (~10x slower decode), so it is off by default.
``algorithm="hqq"`` quantizes the 4-bit matrices with ONNX Runtime's HQQ (``HQQWeightOnlyQuantizer``: a
half-quadratic solver refines each block's zero point, a float), so it shares that slow path; an 8-bit LM head stays
round-to-nearest (ORT's CPU kernel has no 8-bit float zero points). GPTQ-style calibration (ORT's
``GPTQWeightOnlyQuantConfig``) is not offered: it feeds calibration data through a whole ONNX protobuf model with
Intel Neural Compressor's code, outside this in-memory pass. What each option costs in perplexity and speed on
SmolLM2: ``benchmarks/quant_sweep.py`` and the README.
Likewise ``accuracy_level=0`` (float activations) is exact-er but ~15x slower than the int8-activation path (4).

Contract: graph inputs/outputs unchanged; only ``com.microsoft`` is added to the opset imports. Idempotent (nothing
left to match the second time).
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from qgraph.graph_utils import MS_DOMAIN, add_initializer, derived_name
from qgraph.pass_manager import CountedResult, GraphPass

ALGORITHMS = ("rtn", "hqq")


def _const(value: ir.Value | None) -> np.ndarray | None:
    if value is None or value.const_value is None or not value.is_initializer():
        return None
    return value.const_value.numpy()


def _ort_quantizer():
    """ONNX Runtime's weight-only quantizer module, imported without the side effect of importing it.

    ``matmul_nbits_quantizer`` calls ``logging.basicConfig(level=INFO)`` when imported, which would print every INFO
    line of every library (onnx_ir's pass logs, with stacks) for the rest of the user's process; the root logger's
    handlers and level are put back as they were.
    """
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        from onnxruntime.quantization import matmul_nbits_quantizer
    finally:
        for handler in root.handlers[:]:
            if handler not in handlers:
                root.removeHandler(handler)
        root.setLevel(level)
    return matmul_nbits_quantizer


def _reuse_or_add(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """The initializer ``name`` (a second reader of the same table shares it), else a new one holding ``array``."""
    return graph.initializers.get(name) or add_initializer(graph, name, array)


def _attr(node: ir.Node, name: str, default):
    attr = node.attributes.get(name)
    return default if attr is None else attr.value


class QuantizeWeights(GraphPass):
    """Constant-weight MatMul/Gemm -> ``com.microsoft.MatMulNBits`` (weight-only, blockwise, 4 or 8 bits)."""

    name = "quantize-weights"
    emits = frozenset({(MS_DOMAIN, "MatMulNBits"), (MS_DOMAIN, "GatherBlockQuantized")})
    summary = "weight-only blockwise int4/int8 quantization of constant MatMul/Gemm weights to MatMulNBits"

    def __init__(
        self,
        bits: int = 4,
        block_size: int = 32,
        symmetric: bool = False,
        accuracy_level: int = 4,
        min_elements: int = 4096,
        head_bits: int | None = 8,
        float_zero_points: bool = False,
        embedding_bits: int | None = None,
        algorithm: str = "rtn",
    ):
        for name, value in (("bits", bits), ("head_bits", head_bits if head_bits is not None else bits)):
            if value not in (4, 8):
                raise ValueError(f"{name} must be 4 or 8, got {value}")
        if algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {', '.join(ALGORITHMS)}, got {algorithm!r}")
        if algorithm == "hqq" and (symmetric or bits != 4):
            raise ValueError(
                "algorithm 'hqq' is 4-bit and asymmetric (a float zero point per block; ONNX Runtime's CPU "
                f"MatMulNBits has no 8-bit form of it), got bits={bits}, symmetric={symmetric}"
            )
        self.algorithm = algorithm
        if embedding_bits not in (8, None):
            raise ValueError(f"embedding_bits must be 8 or None (tables stay float32), got {embedding_bits}")
        self.embedding_bits = embedding_bits
        if block_size < 16 or block_size & (block_size - 1):
            raise ValueError(f"block_size must be a power of two >= 16, got {block_size}")
        self.bits, self.block_size, self.symmetric = bits, block_size, symmetric
        self.accuracy_level, self.min_elements = accuracy_level, min_elements
        self.head_bits = bits if head_bits is None else head_bits
        self.float_zero_points = float_zero_points

    # -- matching -----------------------------------------------------------------------------------------------

    def _weight_kn(self, node: ir.Node) -> tuple[np.ndarray, ir.Value, ir.Value | None] | None:
        """The ``[K, N]`` float32 weight of ``node`` (plus the initializer it came from and a bias), or None."""
        if node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
            return None
        b = node.inputs[1]
        bias = None
        if node.op_type == "MatMul":
            w = _const(b)
            if w is not None:
                return (w, b, None) if w.ndim == 2 else None
            producer = b.producer() if b is not None else None
            if producer is not None and producer.op_type == "Transpose" and producer.domain in ("", "ai.onnx"):
                src = producer.inputs[0]
                w = _const(src)
                perm = _attr(producer, "perm", None)
                if w is not None and w.ndim == 2 and (perm is None or list(perm) == [1, 0]):
                    return w.T, src, None
            return None
        if node.op_type == "Gemm":
            if _attr(node, "alpha", 1.0) != 1.0 or _attr(node, "beta", 1.0) != 1.0 or _attr(node, "transA", 0):
                return None
            w = _const(b)
            if w is None or w.ndim != 2:
                return None
            if len(node.inputs) > 2 and node.inputs[2] is not None:
                bias = node.inputs[2]
                c = _const(bias)
                if c is None or c.ndim != 1:
                    return None
            return (w.T if _attr(node, "transB", 0) else w), b, bias
        return None

    # -- rewriting ----------------------------------------------------------------------------------------------

    def _quantize(self, w_kn: np.ndarray, bits: int):
        if self.algorithm == "hqq" and bits == 4:  # an 8-bit LM head stays round-to-nearest
            return self._quantize_hqq(w_kn)
        if bits == 4 and self.float_zero_points and not self.symmetric:
            return self._quantize_min_max(w_kn)
        return self._quantize_rtn(w_kn, bits)

    def _quantize_rtn(self, w_kn: np.ndarray, bits: int):
        """ONNX Runtime's round-to-nearest blocks (integer zero points unless symmetric)."""
        ort_quantizer = _ort_quantizer()
        config = ort_quantizer.DefaultWeightOnlyQuantConfig(
            block_size=self.block_size, is_symmetric=self.symmetric, bits=bits
        )
        return ort_quantizer.DefaultWeightOnlyQuantizer(config).qbits_block_quant(
            np.ascontiguousarray(w_kn, dtype=np.float32)
        )

    def _quantize_hqq(self, w_kn: np.ndarray):
        """ONNX Runtime's HQQ (``HQQWeightOnlyQuantizer.quantize_internal``: blocks along K per output column, scale
        and a float zero point refined by its half-quadratic solver), packed as MatMulNBits reads it."""
        import torch

        ort_quantizer = _ort_quantizer()
        config = ort_quantizer.HQQWeightOnlyQuantConfig(block_size=self.block_size, bits=4)
        quantizer = ort_quantizer.HQQWeightOnlyQuantizer(config)
        weight = torch.from_numpy(np.ascontiguousarray(w_kn.T, dtype=np.float32))
        with torch.no_grad():
            q, scales, zero_points = quantizer.quantize_internal(weight, bits=4, group_size=self.block_size)
        q = q.numpy().astype(np.uint8).reshape(q.shape[0], -1, self.block_size)
        packed = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
        return packed, scales.numpy().astype(np.float32), zero_points.numpy().astype(np.float32)

    def _quantize_min_max(self, w_kn: np.ndarray):
        """4-bit blocks along K per output column: q = round((w - min) / scale), zero point -min / scale (float)."""
        k, n = w_kn.shape
        blocks = -(-k // self.block_size)
        w = np.zeros((n, blocks * self.block_size), np.float32)
        w[:, :k] = w_kn.T
        w[:, k:] = w[:, k - 1 : k]  # padding repeats a real value: it never widens a block's range
        w = w.reshape(n, blocks, self.block_size)
        low, high = w.min(-1), w.max(-1)
        scale = ((high - low) / 15).astype(np.float32)
        scale[scale == 0] = 1.0
        q = np.clip(np.rint((w - low[..., None]) / scale[..., None]), 0, 15).astype(np.uint8)
        packed = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
        return packed, scale, (-low / scale).astype(np.float32)

    def _embedding_table(self, node: ir.Node) -> np.ndarray | None:
        """The float32 ``[V, H]`` table a ``Gather`` (axis 0) reads rows of, when large enough to quantize."""
        if node.op_type != "Gather" or node.domain not in ("", "ai.onnx") or _attr(node, "axis", 0) != 0:
            return None
        table = _const(node.inputs[0])
        if table is None or table.ndim != 2 or table.dtype != np.float32 or table.size < self.min_elements:
            return None
        return table if table.shape[1] % self.block_size == 0 else None

    def _quantize_embedding(self, graph: ir.Graph, node: ir.Node, table: np.ndarray) -> int:
        """``Gather(E, ids)`` -> ``GatherBlockQuantized(E_q8, ids, scales, zero_points)``; returns the bytes kept."""
        rows, width = table.shape
        # GatherBlockQuantized reads integer zero points only: round-to-nearest whatever the MatMuls use
        packed, scales, zero_points = self._quantize_rtn(np.ascontiguousarray(table.T), self.embedding_bits)
        base = node.inputs[0].name or node.name
        data, scales_value, zero_points_value = (
            _reuse_or_add(graph, f"{base}_gather_{suffix}", array)
            for suffix, array in (
                (f"Q{self.embedding_bits}", packed.reshape(rows, width)),
                ("scales", scales.reshape(rows, -1)),
                ("zero_points", zero_points.reshape(rows, -1)),
            )
        )
        attributes = [
            ir.AttrInt64("bits", self.embedding_bits),
            ir.AttrInt64("block_size", self.block_size),
            ir.AttrInt64("gather_axis", 0),
            ir.AttrInt64("quantize_axis", 1),
        ]
        inputs = [data, node.inputs[1], scales_value, zero_points_value]
        new = ir.Node(
            MS_DOMAIN, "GatherBlockQuantized", inputs, attributes, name=derived_name(node, "GatherBlockQuantized")
        )
        new.outputs[0].shape, new.outputs[0].type = node.outputs[0].shape, node.outputs[0].type
        ir.convenience.replace_nodes_and_values(graph, node, [node], [new], node.outputs, new.outputs)
        return packed.nbytes + scales.nbytes + zero_points.nbytes

    def call(self, model: ir.Model) -> CountedResult:
        from qgraph.passes.last_token_logits import find_lm_head

        graph = model.graph
        head = find_lm_head(graph)
        quantized = skipped = embeddings = 0
        bytes_before = bytes_after = 0
        for node in list(graph):
            found = self._weight_kn(node)
            if found is None:
                continue
            w_kn, source, bias = found
            if w_kn.dtype != np.float32 or w_kn.size < self.min_elements:
                skipped += 1
                continue
            k, n = w_kn.shape
            bits = self.head_bits if node is head else self.bits
            packed, scales, zero_points = self._quantize(w_kn, bits)
            base = source.name or node.name
            inputs = [
                node.inputs[0],
                graph.initializers.get(f"{base}_Q{bits}") or add_initializer(graph, f"{base}_Q{bits}", packed),
                graph.initializers.get(f"{base}_scales")
                or add_initializer(graph, f"{base}_scales", scales.reshape(-1)),
            ]
            if not self.symmetric:
                zp_name = f"{base}_zero_points"
                inputs.append(
                    graph.initializers.get(zp_name) or add_initializer(graph, zp_name, zero_points.reshape(-1))
                )
            else:
                inputs.append(None)
            if bias is not None:
                inputs += [None, bias]  # g_idx unused; bias at input 5
            while inputs and inputs[-1] is None:
                inputs.pop()
            attributes = [
                ir.AttrInt64("K", k),
                ir.AttrInt64("N", n),
                ir.AttrInt64("bits", bits),
                ir.AttrInt64("block_size", self.block_size),
            ]
            if self.accuracy_level:
                attributes.append(ir.AttrInt64("accuracy_level", self.accuracy_level))
            new = ir.Node(MS_DOMAIN, "MatMulNBits", inputs, attributes, name=derived_name(node, "MatMulNBits"))
            new.outputs[0].shape = node.outputs[0].shape
            new.outputs[0].type = node.outputs[0].type
            ir.convenience.replace_nodes_and_values(graph, node, [node], [new], node.outputs, new.outputs)
            quantized += 1
            bytes_before += w_kn.nbytes
            bytes_after += packed.nbytes + scales.nbytes + (0 if self.symmetric else zero_points.nbytes)
        for node in list(graph) if self.embedding_bits else []:
            table = self._embedding_table(node)
            if table is not None:
                bytes_after += self._quantize_embedding(graph, node, table)
                bytes_before += table.nbytes
                embeddings += 1
        if quantized or embeddings:
            model.opset_imports.setdefault(MS_DOMAIN, 1)
            RemoveUnusedNodesPass()(model)  # the float weights (and tied heads' Transposes) nothing reads
        return self.result(
            model,
            quantized=quantized,
            embeddings_quantized=embeddings,
            skipped_small=skipped,
            weight_mib_before=round(bytes_before / 2**20),
            weight_mib_after=round(bytes_after / 2**20),
        )

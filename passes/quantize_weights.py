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

4-bit blocks come from one of four algorithms: ``"rtn"`` (ONNX Runtime's round-to-nearest: scale
``(max - min) / 15`` and an integer zero point, which rounds the block's minimum onto the scale grid), ``"minmax"``
(the same scale with the float zero point ``-min / scale``: ``w = scale * q + min``, llama.cpp's Q4_1 blocks),
``"hqq"`` (ONNX Runtime's HQQ, ``HQQWeightOnlyQuantizer``: a half-quadratic solver refines each block's scale and
float zero point) and ``"auto"``: ``"minmax"`` when most 4-bit weights' blocks already lie on 16 min/max levels (a
checkpoint dequantized from 4-bit blocks: there it is exact, and its LM head, kept at 8 bits by such files, still
gains from it), ``"rtn"`` otherwise (a model trained in bf16: there min/max blocks come within ~3 % of
round-to-nearest's error and the split float zero points would only cost time). It logs what it chose; the report
counts the weights on a grid.
An 8-bit LM head stays round-to-nearest whatever the algorithm.

Float zero points are executed one of two ways (``float_zero_points``):

- ``"split"`` (default): MatMulNBits reads the rounded integer zero point ``z_i`` (its fast int8 kernel, ``MLAS``
  ``SQNBitGemm``), and the rest, ``scale * (z_i - z)``, one number per block and output column, is a ``[K / block,
  N]`` matrix ``R`` with ``x @ W = x @ W_int + blocksum(x) @ R``. ``R`` rides in the same node as extra rows of K:
  the input becomes ``Concat(x, ReduceSum(Reshape(x, [..., K / block, block])))`` (three small nodes per distinct
  input, shared by every MatMul reading it) and ``R``'s rows are quantized to 4 bits in blocks of their own, so a
  block's offset is kept to ~1/30 of the largest step of its column instead of up to half a step.
- ``"input"``: MatMulNBits' float ``zero_points`` input, exact, but ONNX Runtime's CPU kernel does not pre-pack a
  float zero point and dequantizes the whole matrix to a float GEMM on every call (~10x slower decode).

On weights already on a Q4_1 grid (SmolLM2's float32 files here were dequantized from Q4_1) ``"minmax"`` finds that
grid exactly; on other weights its blocks are the usual min/max 4-bit blocks (``benchmarks/quant_sweep.py`` and the
README measure what each option costs in perplexity and speed on SmolLM2). The report counts the nodes and gives
``weight_rms_error_bp``: the root-mean-square difference of the dequantized weights from the float ones, in basis
points (1/10,000) of the weights' own root mean square. GPTQ-style calibration (ORT's ``GPTQWeightOnlyQuantConfig``)
is not offered: it feeds calibration data through a whole ONNX protobuf model with Intel Neural Compressor's code,
outside this in-memory pass.
Likewise ``accuracy_level=0`` (float activations) is exact-er but ~15x slower than the int8-activation path (4).

Contract: graph inputs/outputs unchanged; only ``com.microsoft`` is added to the opset imports. Idempotent (nothing
left to match the second time).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from qgraph.graph_utils import MS_DOMAIN, add_initializer, derived_name, onnx_opset
from qgraph.pass_manager import CountedResult, GraphPass

log = logging.getLogger(__name__)

ALGORITHMS = ("rtn", "minmax", "hqq", "auto")
# "auto": a weight is on a 4-bit min/max grid when this share of its values (in blocks whose levels are not all one
# value) lies within this fraction of a step of a level; off-grid weights have ~6 % there (each block's min and max)
ON_GRID_SHARE, ON_GRID_TOLERANCE = 0.99, 1e-3
GRID_SAMPLE_COLUMNS = 256  # a dequantized checkpoint's columns are all on the grid: a sample tells
FLOAT_ZERO_POINTS = ("split", "input")


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


def _unpack(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """``count`` integers per row from MatMulNBits' byte layout (4-bit: low nibble first)."""
    if bits == 8:
        return packed[..., :count].astype(np.uint8)
    out = np.empty((*packed.shape[:-1], 2 * packed.shape[-1]), np.uint8)
    out[..., 0::2], out[..., 1::2] = packed & 15, packed >> 4
    return out[..., :count]


def _pack(values: np.ndarray, bits: int) -> np.ndarray:
    """Integers (last axis) into MatMulNBits' byte layout; an odd count of 4-bit values is padded with a zero."""
    values = values.astype(np.uint8)
    if bits == 8:
        return values
    if values.shape[-1] % 2:
        values = np.concatenate([values, np.zeros((*values.shape[:-1], 1), np.uint8)], axis=-1)
    return values[..., 0::2] | (values[..., 1::2] << 4)


def on_min_max_grid(w_kn: np.ndarray, block_size: int, levels: int = 15) -> bool:
    """Whether ``w_kn``'s blocks of ``block_size`` along K each lie on ``levels + 1`` evenly spaced values from their
    minimum to their maximum (``min + (max - min) / levels * q``), as weights dequantized from such blocks do."""
    k, n = w_kn.shape
    if k % block_size:
        return False
    w = w_kn.T.reshape(n, k // block_size, block_size)
    low = w.min(-1, keepdims=True)
    step = (w.max(-1, keepdims=True) - low) / levels
    varied = step[..., 0] > 0
    if not varied.any():
        return False
    position = (w - low) / np.where(step > 0, step, 1)
    near = np.abs(position - np.rint(position)) <= ON_GRID_TOLERANCE
    return bool(near[varied].mean() >= ON_GRID_SHARE)


@dataclass
class Blocks:
    """A ``[K, N]`` weight as blocks along K per output column: ``w ~ scales * (q - zero_points)``.

    ``q`` ``[N, blocks, block]`` integers (unpacked), ``scales`` ``[N, blocks]``, ``zero_points`` ``[N, blocks]``
    (uint8, or float32 for a float zero point; None: symmetric, MatMulNBits' default ``2**(bits - 1)``).
    """

    q: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None
    bits: int

    @property
    def float_zero_points(self) -> bool:
        return self.zero_points is not None and self.zero_points.dtype != np.uint8

    def dequantized(self, k: int) -> np.ndarray:
        """The ``[K, N]`` float weight these blocks stand for (what MatMulNBits multiplies by)."""
        zero = 2 ** (self.bits - 1) if self.zero_points is None else self.zero_points[..., None].astype(np.float32)
        w = self.scales[..., None] * (self.q.astype(np.float32) - zero)
        return w.reshape(w.shape[0], -1)[:, :k].T


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
        embedding_bits: int | None = None,
        algorithm: str = "rtn",
        float_zero_points: str = "split",
    ):
        for name, value in (("bits", bits), ("head_bits", head_bits if head_bits is not None else bits)):
            if value not in (4, 8):
                raise ValueError(f"{name} must be 4 or 8, got {value}")
        if algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {', '.join(ALGORITHMS)}, got {algorithm!r}")
        if algorithm != "rtn" and (symmetric or bits != 4):
            raise ValueError(
                f"algorithm {algorithm!r} is 4-bit and asymmetric (a float zero point per block), got bits={bits}, "
                f"symmetric={symmetric}: use algorithm 'rtn' for those"
            )
        if float_zero_points not in FLOAT_ZERO_POINTS:
            raise ValueError(
                f"float_zero_points must be one of {', '.join(FLOAT_ZERO_POINTS)} (how MatMulNBits executes a float "
                f"zero point), got {float_zero_points!r}"
            )
        self.algorithm, self.float_zero_points = algorithm, float_zero_points
        if embedding_bits not in (8, None):
            raise ValueError(f"embedding_bits must be 8 or None (tables stay float32), got {embedding_bits}")
        self.embedding_bits = embedding_bits
        if block_size < 16 or block_size & (block_size - 1):
            raise ValueError(f"block_size must be a power of two >= 16, got {block_size}")
        self.bits, self.block_size, self.symmetric = bits, block_size, symmetric
        self.accuracy_level, self.min_elements = accuracy_level, min_elements
        self.head_bits = bits if head_bits is None else head_bits

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

    # -- quantizing ---------------------------------------------------------------------------------------------

    def _quantize(self, w_kn: np.ndarray, bits: int, algorithm: str) -> Blocks:
        if bits == 4 and algorithm == "hqq":  # an 8-bit LM head stays round-to-nearest
            return self._quantize_hqq(w_kn)
        if bits == 4 and algorithm == "minmax":
            return self._quantize_min_max(w_kn)
        return self._quantize_rtn(w_kn, bits, self.symmetric)

    def _resolved_algorithm(self, weights: list[np.ndarray]) -> tuple[str, int]:
        """``self.algorithm``, with ``"auto"`` resolved over the 4-bit ``weights``: ``"minmax"`` when more than half
        lie on a 4-bit min/max grid (judged on up to ``GRID_SAMPLE_COLUMNS`` columns each), else ``"rtn"``; and how
        many lie on one."""
        on_grid = sum(on_min_max_grid(w[:, :GRID_SAMPLE_COLUMNS], self.block_size) for w in weights)
        if self.algorithm != "auto":
            return self.algorithm, on_grid
        return ("minmax" if 2 * on_grid > len(weights) else "rtn"), on_grid

    def _quantize_rtn(self, w_kn: np.ndarray, bits: int, symmetric: bool) -> Blocks:
        """ONNX Runtime's round-to-nearest blocks (integer zero points unless symmetric)."""
        ort_quantizer = _ort_quantizer()
        config = ort_quantizer.DefaultWeightOnlyQuantConfig(
            block_size=self.block_size, is_symmetric=symmetric, bits=bits
        )
        packed, scales, zero_points = ort_quantizer.DefaultWeightOnlyQuantizer(config).qbits_block_quant(
            np.ascontiguousarray(w_kn, dtype=np.float32)
        )
        n, blocks = packed.shape[0], packed.shape[1]
        q = _unpack(packed, bits, self.block_size)
        zero = None if symmetric else _unpack(zero_points.reshape(n, -1), bits, blocks)
        return Blocks(q, scales.reshape(n, blocks).astype(np.float32), zero, bits)

    def _quantize_hqq(self, w_kn: np.ndarray) -> Blocks:
        """ONNX Runtime's HQQ (``HQQWeightOnlyQuantizer.quantize_internal``: blocks along K per output column, scale
        and a float zero point refined by its half-quadratic solver)."""
        import torch

        ort_quantizer = _ort_quantizer()
        config = ort_quantizer.HQQWeightOnlyQuantConfig(block_size=self.block_size, bits=4)
        quantizer = ort_quantizer.HQQWeightOnlyQuantizer(config)
        weight = torch.from_numpy(np.array(w_kn.T, dtype=np.float32))  # a writable copy: torch needs one
        with torch.no_grad():
            q, scales, zero_points = quantizer.quantize_internal(weight, bits=4, group_size=self.block_size)
        q = q.numpy().astype(np.uint8).reshape(q.shape[0], -1, self.block_size)
        n, blocks = q.shape[0], q.shape[1]
        return Blocks(
            q,
            scales.numpy().astype(np.float32).reshape(n, blocks),
            zero_points.numpy().astype(np.float32).reshape(n, blocks),
            4,
        )

    def _quantize_min_max(self, w_kn: np.ndarray) -> Blocks:
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
        return Blocks(q, scale, (-low / scale).astype(np.float32), 4)

    def _split(self, blocks: Blocks) -> Blocks:
        """Float zero points as integer ones plus ``K / block`` extra rows of K holding the rest (``R``): row
        ``K + b`` of column ``n`` is ``scale * (round(z) - z)`` of block ``b``, itself quantized round-to-nearest in
        blocks of its own; the node's input carries each block's sum there (``_blocksum_input``). The extra rows
        end in a partial block: padding them to whole blocks (a Pad node) was measured slower, not faster."""
        top = 2**blocks.bits - 1
        integer = np.clip(np.rint(blocks.zero_points), 0, top).astype(np.uint8)
        rest = blocks.scales * (integer.astype(np.float32) - blocks.zero_points)  # [N, blocks]
        extra = self._quantize_rtn(np.ascontiguousarray(rest.T), blocks.bits, symmetric=False)
        return Blocks(
            np.concatenate([blocks.q, extra.q], axis=1),
            np.concatenate([blocks.scales, extra.scales], axis=1),
            np.concatenate([integer, extra.zero_points], axis=1),
            blocks.bits,
        )

    # -- rewriting ----------------------------------------------------------------------------------------------

    def _blocksum_input(self, graph: ir.Graph, x: ir.Value, k: int, before: ir.Node, opset: int) -> ir.Value | None:
        """``Concat(x, ReduceSum(Reshape(x, [..., K / block, block]), -1))``, built once per input (inserted before
        its first reader), or None when ``x``'s rank is unknown."""
        rank = x.shape.rank() if x.shape is not None else None
        if rank is None:
            return None
        blocks = k // self.block_size
        base = x.name or "x"
        shape = _reuse_or_add(graph, f"{base}_block_shape", np.array([0] * (rank - 1) + [blocks, self.block_size]))
        reshape = ir.node("Reshape", [x, shape], name=f"{base}_blocks")
        if opset >= 13:
            axes = _reuse_or_add(graph, "quantize_weights_last_axis", np.array([-1], np.int64))
            reduce = ir.node("ReduceSum", [reshape.outputs[0], axes], {"keepdims": 0}, name=f"{base}_blocksums")
        else:
            attributes = {"axes": [-1], "keepdims": 0}
            reduce = ir.node("ReduceSum", [reshape.outputs[0]], attributes, name=f"{base}_blocksums")
        concat = ir.node("Concat", [x, reduce.outputs[0]], {"axis": -1}, name=f"{base}_with_blocksums")
        for node in (reshape, reduce, concat):
            node.outputs[0].name = node.name
        dims = list(x.shape)
        dims[-1] = k + blocks
        concat.outputs[0].type, concat.outputs[0].shape = x.type, ir.Shape(dims)
        graph.insert_before(before, [reshape, reduce, concat])
        return concat.outputs[0]

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
        quantized = self._quantize_rtn(np.ascontiguousarray(table.T), self.embedding_bits, symmetric=False)
        packed, scales, zero_points = quantized.q, quantized.scales, quantized.zero_points
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
        opset = onnx_opset(model)
        counts = dict.fromkeys(
            ("quantized", "float_zero_points_split", "float_zero_points_input", "blocksum_inputs", "skipped_small"), 0
        )
        bytes_before = bytes_after = 0
        squared_error = squared_weight = 0.0
        with_blocksums: dict[ir.Value, ir.Value | None] = {}
        targets = []
        for node in list(graph):
            found = self._weight_kn(node)
            if found is None:
                continue
            if found[0].dtype != np.float32 or found[0].size < self.min_elements:
                counts["skipped_small"] += 1
                continue
            targets.append((node, *found, self.head_bits if node is head else self.bits))
        algorithm, on_grid = self._resolved_algorithm([w for _, w, _, _, bits in targets if bits == 4])
        if self.algorithm == "auto" and targets:
            log.info("quantize-weights: algorithm auto -> %s (%d weights on a 4-bit min/max grid)", algorithm, on_grid)
        for node, w_kn, source, bias, bits in targets:
            k, n = w_kn.shape
            blocks = self._quantize(w_kn, bits, algorithm)
            x, k_read = node.inputs[0], k
            if blocks.float_zero_points and self.float_zero_points == "split" and k % self.block_size == 0:
                if x not in with_blocksums:
                    with_blocksums[x] = self._blocksum_input(graph, x, k, node, opset)
                    counts["blocksum_inputs"] += with_blocksums[x] is not None
                if with_blocksums[x] is not None:
                    blocks = self._split(blocks)
                    x, k_read = with_blocksums[x], k + k // self.block_size
                    counts["float_zero_points_split"] += 1
            if blocks.float_zero_points:
                counts["float_zero_points_input"] += 1
            w_hat = blocks.dequantized(k_read)
            if k_read != k:  # the extra rows add blocksum(x) @ R: in weight terms, R repeated over each block
                w_hat = w_hat[:k] + np.repeat(w_hat[k:], self.block_size, axis=0)
            squared_error += float(np.square(w_hat - w_kn, dtype=np.float64).sum())
            squared_weight += float(np.square(w_kn, dtype=np.float64).sum())
            packed = _pack(blocks.q, bits)
            scales = blocks.scales.reshape(-1)
            base = source.name or node.name
            suffix = f"Q{bits}" + ("_split" if k_read != k else "")
            inputs = [
                x,
                _reuse_or_add(graph, f"{base}_{suffix}", packed),
                _reuse_or_add(graph, f"{base}_{suffix}_scales", scales),
            ]
            zero_points = None
            if blocks.zero_points is not None:
                zero_points = (
                    blocks.zero_points.reshape(-1)
                    if blocks.float_zero_points
                    else _pack(blocks.zero_points, bits).reshape(-1)
                )
                inputs.append(_reuse_or_add(graph, f"{base}_{suffix}_zero_points", zero_points))
            else:
                inputs.append(None)
            if bias is not None:
                inputs += [None, bias]  # g_idx unused; bias at input 5
            while inputs and inputs[-1] is None:
                inputs.pop()
            attributes = [
                ir.AttrInt64("K", k_read),
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
            counts["quantized"] += 1
            bytes_before += w_kn.nbytes
            bytes_after += packed.nbytes + scales.nbytes + (0 if zero_points is None else zero_points.nbytes)
        embeddings = 0
        for node in list(graph) if self.embedding_bits else []:
            table = self._embedding_table(node)
            if table is not None:
                bytes_after += self._quantize_embedding(graph, node, table)
                bytes_before += table.nbytes
                embeddings += 1
        if counts["quantized"] or embeddings:
            model.opset_imports.setdefault(MS_DOMAIN, 1)
            RemoveUnusedNodesPass()(model)  # the float weights (and tied heads' Transposes) nothing reads
        return self.result(
            model,
            **counts,
            weights_on_4_bit_grid=on_grid,
            embeddings_quantized=embeddings,
            weight_mib_before=round(bytes_before / 2**20),
            weight_mib_after=round(bytes_after / 2**20),
            weight_rms_error_bp=round(1e4 * (squared_error / squared_weight) ** 0.5) if squared_weight else 0,
        )

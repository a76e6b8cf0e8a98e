"""Rotary position embedding (Llama-style ``rotate_half``) as ONNX Runtime's fused ``com.microsoft.RotaryEmbedding``.

Why: an exported RoPE is seven nodes per tensor (Mul, 2 Slice, Neg, Concat, Mul, Add) for Q and for K in every layer
(420 nodes on SmolLM2), plus the shared cos/sin computation. At batch 1 each node costs more in dispatch than in
arithmetic; one fused node per tensor reading a precomputed cos/sin table does the same work.

Matched, per tensor ``x`` ``[b, heads, s, d]``::

    Add(Mul(x, Unsqueeze(cos)), Mul(Concat(Neg(Slice(x, d/2:)), Slice(x, :d/2)), Unsqueeze(sin)))

where ``cos = Cos(Concat(f, f))``, ``sin = Sin(Concat(f, f))`` and ``f = Mul(positions, inv_freq)`` with ``inv_freq`` a
constant and ``positions`` computed from the ``position_ids`` input (so no attention scaling or other frequency
rewrite is in the way). The tables are ``cos/sin(arange(ctx_len) * inv_freq)`` in float32, ctx_len read from the
retained-state buffers. Padding positions (-1) are clamped to 0 for the table lookup: their K/V never reach a
buffer slot that is attended (the retained-state pass masks them) and their logits are not read.

Contract: graph inputs/outputs unchanged; ``com.microsoft`` added to the opset imports. Idempotent.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from qgraph.graph_utils import add_initializer, const_ints, derived_name, producer_op
from qgraph.pass_manager import CountedResult, GraphPass

MS_DOMAIN = "com.microsoft"
THROUGH = {"Cast", "Unsqueeze", "Reshape", "Transpose", "Squeeze", "Identity"}


def _from_position_ids(value: ir.Value) -> bool:
    for _ in range(8):
        if value.is_graph_input():
            return value.name == "position_ids"
        node = value.producer()
        if node is None or node.op_type not in THROUGH:
            return False
        value = node.inputs[0]
    return False


def _frequencies(trig: ir.Node) -> np.ndarray | None:
    """``inv_freq`` when ``trig`` is Cos/Sin(Concat(f, f)) with f = Mul(positions, inv_freq)."""
    concat = producer_op(trig.inputs[0], "Concat")
    if concat is None or len(concat.inputs) != 2 or concat.inputs[0] is not concat.inputs[1]:
        return None
    mul = producer_op(concat.inputs[0], "Mul")
    if mul is None:
        return None
    for pos, freq in ((mul.inputs[0], mul.inputs[1]), (mul.inputs[1], mul.inputs[0])):
        if freq.const_value is not None and _from_position_ids(pos):
            return np.asarray(freq.const_value.numpy(), dtype=np.float32).reshape(-1)
    return None


class RotaryEmbeddingFusion(GraphPass):
    """``rotate_half`` RoPE on Q/K -> ``com.microsoft.RotaryEmbedding`` with cos/sin tables of ctx_len rows."""

    name = "rotary-embedding"
    summary = "rotate_half RoPE (7 nodes per Q/K tensor) -> com.microsoft.RotaryEmbedding over cos/sin tables"

    def _match(self, add: ir.Node):
        """(x, inv_freq) when ``add`` ends a rotate_half RoPE of x, else None."""
        if add.op_type != "Add" or add.domain not in ("", "ai.onnx"):
            return None
        muls = [producer_op(v, "Mul") for v in add.inputs]
        if any(m is None for m in muls):
            return None
        for m_cos, m_sin in (muls, muls[::-1]):
            concat = next((producer_op(v, "Concat") for v in m_sin.inputs if producer_op(v, "Concat")), None)
            sin_u = next((v for v in m_sin.inputs if producer_op(v, "Concat") is None), None)
            if concat is None or len(concat.inputs) != 2:
                continue
            neg, first_half = producer_op(concat.inputs[0], "Neg"), producer_op(concat.inputs[1], "Slice")
            second_half = producer_op(neg.inputs[0], "Slice") if neg is not None else None
            if first_half is None or second_half is None or first_half.inputs[0] is not second_half.inputs[0]:
                continue
            x = first_half.inputs[0]
            if x.shape is None or len(x.shape) != 4 or not isinstance(x.shape[3], int):
                continue
            d = x.shape[3]
            if const_ints(first_half.inputs[1]) != [0] or const_ints(first_half.inputs[2]) != [d // 2]:
                continue
            if const_ints(second_half.inputs[1]) != [d // 2] or (const_ints(second_half.inputs[2]) or [0])[0] < d:
                continue
            for s in (first_half, second_half):
                axes = const_ints(s.inputs[3]) if len(s.inputs) > 3 else None
                if axes not in ([3], [-1]) or (len(s.inputs) > 4 and const_ints(s.inputs[4]) not in (None, [1])):
                    break
            else:
                if x not in m_cos.inputs:
                    continue
                cos_u = next(v for v in m_cos.inputs if v is not x)
                cos = self._trig(cos_u, "Cos")
                sin = self._trig(sin_u, "Sin")
                if cos is None or sin is None:
                    continue
                f_cos, f_sin = _frequencies(cos), _frequencies(sin)
                if f_cos is None or f_sin is None or not np.array_equal(f_cos, f_sin) or 2 * f_cos.size != d:
                    continue
                return x, f_cos
        return None

    @staticmethod
    def _trig(value: ir.Value | None, op: str) -> ir.Node | None:
        unsqueeze = producer_op(value, "Unsqueeze")
        if unsqueeze is None or const_ints(unsqueeze.inputs[1]) != [1]:
            return None
        return producer_op(unsqueeze.inputs[0], op)

    def call(self, model: ir.Model) -> CountedResult:
        graph = model.graph
        ctx_len = next(
            (
                v.shape[2]
                for v in graph.inputs
                if v.name.startswith("past_") and v.shape and isinstance(v.shape[2], int)
            ),
            None,
        )
        position_ids = next((v for v in graph.inputs if v.name == "position_ids"), None)
        if ctx_len is None or position_ids is None:
            return self.result(model, fused=0)
        fused = 0
        tables: dict[bytes, tuple[ir.Value, ir.Value]] = {}
        clamped = None
        for add in list(graph):
            found = self._match(add)
            if found is None:
                continue
            x, inv_freq = found
            key = inv_freq.tobytes()
            if key not in tables:
                angles = np.arange(ctx_len, dtype=np.float32)[:, None] * inv_freq[None, :]
                tables[key] = tuple(
                    add_initializer(graph, f"rotary_{name}_cache_{len(tables)}", fn(angles).astype(np.float32))
                    for name, fn in (("cos", np.cos), ("sin", np.sin))
                )
            if clamped is None:
                zero = add_initializer(graph, "rotary_position_floor", np.array(0, dtype=np.int64))
                clamp = ir.node("Max", [position_ids, zero], name="rotary_positions_clamped")
                graph.insert_before(next(iter(graph)), [clamp])
                clamped = clamp.outputs[0]
            cos_cache, sin_cache = tables[key]
            rotary = ir.node(
                "RotaryEmbedding",
                [x, clamped, cos_cache, sin_cache],
                {"interleaved": 0},
                domain=MS_DOMAIN,
                name=derived_name(add, "rotary"),
            )
            rotary.outputs[0].shape, rotary.outputs[0].type = add.outputs[0].shape, add.outputs[0].type
            ir.convenience.replace_nodes_and_values(graph, add, [add], [rotary], add.outputs, rotary.outputs)
            fused += 1
        if fused:
            model.opset_imports.setdefault(MS_DOMAIN, 1)
            RemoveUnusedNodesPass()(model)
        return self.result(model, fused=fused)

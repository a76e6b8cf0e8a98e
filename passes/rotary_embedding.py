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

from qgraph import contract
from qgraph.contract import POSITION_IDS
from qgraph.graph_utils import MS_DOMAIN, add_initializer, const_ints, derived_name, input_by_name, producer_op
from qgraph.matching import NoMatch, refuse, require
from qgraph.pass_manager import CountedResult, GraphPass

THROUGH = {"Cast", "Unsqueeze", "Reshape", "Transpose", "Squeeze", "Identity"}


def _from_position_ids(value: ir.Value) -> bool:
    for _ in range(8):
        if value.is_graph_input():
            return value.name == POSITION_IDS
        node = value.producer()
        if node is None or node.op_type not in THROUGH:
            return False
        value = node.inputs[0]
    return False


def _frequencies(trig: ir.Node) -> np.ndarray:
    """``inv_freq`` when ``trig`` is Cos/Sin(Concat(f, f)) with f = Mul(positions, inv_freq); else ``NoMatch``."""
    what = trig.op_type.lower()
    concat = producer_op(trig.inputs[0], "Concat")
    require(
        concat is not None and len(concat.inputs) == 2 and concat.inputs[0] is concat.inputs[1],
        f"the {what} table's angles are not Concat(f, f)",
    )
    mul = require(producer_op(concat.inputs[0], "Mul"), f"the {what} table's f is not Mul(positions, inv_freq)")
    for pos, freq in ((mul.inputs[0], mul.inputs[1]), (mul.inputs[1], mul.inputs[0])):
        if freq.const_value is not None and _from_position_ids(pos):
            return np.asarray(freq.const_value.numpy(), dtype=np.float32).reshape(-1)
    refuse(
        f"the {what} table's f is not a constant inv_freq times positions read from {POSITION_IDS} (a scaled or "
        "otherwise rewritten frequency is in the way)"
    )


def _half_on_last_axis(node: ir.Node) -> bool:
    axes = const_ints(node.inputs[3]) if len(node.inputs) > 3 else None
    return axes in ([3], [-1]) and not (len(node.inputs) > 4 and const_ints(node.inputs[4]) not in (None, [1]))


class RotaryEmbeddingFusion(GraphPass):
    """``rotate_half`` RoPE on Q/K -> ``com.microsoft.RotaryEmbedding`` with cos/sin tables of ctx_len rows."""

    name = "rotary-embedding"
    emits = frozenset({(MS_DOMAIN, "RotaryEmbedding")})
    summary = "rotate_half RoPE (7 nodes per Q/K tensor) -> com.microsoft.RotaryEmbedding over cos/sin tables"

    @staticmethod
    def _candidate(node: ir.Node) -> bool:
        """An ``Add`` of two products: the shape a RoPE ends in (residual and bias Adds are not)."""
        return (
            node.op_type == "Add"
            and node.domain in ("", "ai.onnx")
            and all(producer_op(v, "Mul") is not None for v in node.inputs)
        )

    def _match(self, add: ir.Node) -> tuple[ir.Value, np.ndarray]:
        """(x, inv_freq) when the candidate ``add`` ends a rotate_half RoPE of x, else ``NoMatch`` saying why."""
        muls = [producer_op(v, "Mul") for v in add.inputs]
        orders = [(c, s) for c, s in (muls, muls[::-1]) if any(producer_op(v, "Concat") for v in s.inputs)]
        require(orders, "neither product multiplies rotate_half(x) (a Concat(-x2, x1))")
        reasons = []
        for m_cos, m_sin in orders:
            try:
                return self._match_products(m_cos, m_sin)
            except NoMatch as exc:
                reasons.append(str(exc))
        refuse("; ".join(dict.fromkeys(reasons)))

    def _match_products(self, m_cos: ir.Node, m_sin: ir.Node) -> tuple[ir.Value, np.ndarray]:
        """(x, inv_freq) for ``m_cos = x * cos`` and ``m_sin = rotate_half(x) * sin``."""
        concat = next(producer_op(v, "Concat") for v in m_sin.inputs if producer_op(v, "Concat"))
        sin_u = next((v for v in m_sin.inputs if producer_op(v, "Concat") is None), None)
        require(len(concat.inputs) == 2, f"rotate_half's Concat has {len(concat.inputs)} inputs, not 2")
        neg = require(producer_op(concat.inputs[0], "Neg"), "rotate_half's Concat does not start with Neg(x2)")
        second_half = require(producer_op(neg.inputs[0], "Slice"), "rotate_half negates something other than a Slice")
        first_half = require(producer_op(concat.inputs[1], "Slice"), "rotate_half's Concat does not end with a Slice")
        require(first_half.inputs[0] is second_half.inputs[0], "rotate_half's halves are slices of different values")
        x = first_half.inputs[0]
        require(
            x.shape is not None and len(x.shape) == 4 and isinstance(x.shape[3], int),
            f"the rotated value's shape {x.shape} is not [b, heads, s, d] with a static head size",
        )
        d = x.shape[3]
        require(
            const_ints(first_half.inputs[1]) == [0] and const_ints(first_half.inputs[2]) == [d // 2],
            f"rotate_half's first half is not x[..., :{d // 2}]",
        )
        require(
            const_ints(second_half.inputs[1]) == [d // 2] and (const_ints(second_half.inputs[2]) or [0])[0] >= d,
            f"rotate_half's second half is not x[..., {d // 2}:]",
        )
        require(
            _half_on_last_axis(first_half) and _half_on_last_axis(second_half),
            "rotate_half's halves are not sliced on the last axis with step 1",
        )
        require(x in m_cos.inputs, "the other product does not multiply the rotated value itself")
        cos_u = next(v for v in m_cos.inputs if v is not x)
        cos = require(self._trig(cos_u, "Cos"), "x is not multiplied by Unsqueeze(Cos(angles), 1)")
        sin = require(self._trig(sin_u, "Sin"), "rotate_half(x) is not multiplied by Unsqueeze(Sin(angles), 1)")
        f_cos, f_sin = _frequencies(cos), _frequencies(sin)
        require(np.array_equal(f_cos, f_sin), "the cos and sin tables use different frequencies")
        require(
            2 * f_cos.size == d,
            f"{f_cos.size} frequencies rotate {2 * f_cos.size} of the head's {d} dimensions (partial rotary)",
        )
        return x, f_cos

    @staticmethod
    def _trig(value: ir.Value | None, op: str) -> ir.Node | None:
        unsqueeze = producer_op(value, "Unsqueeze")
        if unsqueeze is None or const_ints(unsqueeze.inputs[1]) != [1]:
            return None
        return producer_op(unsqueeze.inputs[0], op)

    def call(self, model: ir.Model) -> CountedResult:
        graph = model.graph
        ctx_len = next(
            (p.input.shape[2] for p in contract.kv_pairs(graph) if p.input.shape and isinstance(p.input.shape[2], int)),
            None,
        )
        position_ids = input_by_name(graph, POSITION_IDS)
        if ctx_len is None or position_ids is None:
            result = self.result(model, fused=0)
            result.misses = [f"no static retained-state buffers or no {POSITION_IDS} input: not a retained-state graph"]
            return result
        fused = 0
        misses = []
        tables: dict[bytes, tuple[ir.Value, ir.Value]] = {}
        clamped = None
        for add in [n for n in graph if self._candidate(n)]:
            try:
                x, inv_freq = self._match(add)
            except NoMatch as exc:
                misses.append(f"Add {add.name or '(unnamed)'}: {exc}")
                continue
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
        result = self.result(model, fused=fused)
        result.misses = misses
        return result

"""Retained-state attention as ONNX Runtime's fused ``com.microsoft.GroupQueryAttention`` (GQA), cache updated in place.

Why: after ``kv-retained-state`` every layer's attention is ~15 nodes per step: the K and V scatters into the
``ctx_len`` buffers (with their index Expand and padding Where), the score MatMul against the transposed cache, scale,
mask Add, Softmax, the probs MatMul, and the Reshape/Transpose/Split that put the heads in place. At batch 1 each node
costs more in dispatch and copies than in arithmetic. ORT's GQA kernel does the cache write and the attention over
only the valid slots in one node, reading the query, key and value straight from the projection.

Matched, per layer (a graph left by ``kv-retained-state``, optionally after ``grouped-query-matmul``,
``shared-head-transpose`` and ``rotary-embedding``)::

    present_k = ScatterElements(past_key.i, idx, [Where(real, ] k [, 0)])     (axis 2; likewise present_v)
    scores    = [Reshape(] MatMul([Reshape(] q [)], Transpose(repeat?(present_k), [0, 1, 3, 2])) [)]
    probs     = Softmax(Add(Mul|Div(scores, c) | scores, causal_mask))
    out       = Transpose([Reshape(] MatMul([Reshape(] probs [)], repeat?(present_v)) [)], [0, 2, 1, 3])

(``repeat?``: eager GQA's K/V head repeat ``Reshape(Expand(Unsqueeze(x, 2)))``, if any; bracketed Reshapes: the
grouped form ``grouped-query-matmul`` leaves.)

``causal_mask`` must be the retained-state pass's causal mask (``Where(LessOrEqual(slots, position), 0, min)``),
optionally with its sliding window (``And`` with ``slots > position - w``: GQA's ``local_window_size = w``).
ALiBi, softcap or any other score term is not GQA's attention and is left alone (counted, with any other Softmax such
as a MoE router's, as ``softmax_left_unfused``). q/k/v ``[b, heads, s, d]`` are read back as ``[b, s, heads * d]``:
the shared q/k/v projection itself (packed QKV) when they are the three parts of ``Split(Transpose(Reshape(qkv)))``,
else each part's own projection, else a Transpose + Reshape is inserted. q and k through
``com.microsoft.RotaryEmbedding`` with the same cos/sin tables become GQA's own rotary (``do_rotary``).

Contract (the runtime's, stated in ``qgraph.runtime``): in one run a row's real tokens sit at contiguous positions
starting at its first column; padding (-1) only follows them. GQA derives positions from ``seqlens_k``: each row is
given ``seqlens_k = start + s - 1`` where ``start`` is its first position (a row of padding only takes the batch's
largest start), clamped so the write stays inside ``ctx_len``. So a chunk's padding columns are written to slots after
the row's last token, which every later query writes itself before attending to it; the padding rows' q/k/v are zeroed
so nothing non-finite enters ``probs @ V`` (a slot read with probability 0 still adds ``0 * value``). Dropping this
per-layer ``Where`` (~2 % of an int4 decode step) was tried and broke Helium's batch of two in
``tests/test_architectures.py`` (the padded row decoded token 0 throughout): padding K/V need not be finite. GQA
updates ``past_*`` in place when the session binds each past/present
pair to one buffer (the ORT backend does); otherwise it copies. Logits of real tokens equal the unfused graph's.

Graph inputs/outputs unchanged; ``com.microsoft`` added to the opset imports. Idempotent (no scatter left to match).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from qgraph.contract import INPUT_IDS, POSITION_IDS
from qgraph.graph_utils import (
    MS_DOMAIN,
    const,
    const_ints,
    derived_name,
    input_by_name,
    prepend,
    producer_op,
    scalar,
    static_dim,
)
from qgraph.matching import NoMatch, refuse, require
from qgraph.pass_manager import CountedResult, GraphPass
from qgraph.retained_forms import match_additive_position_mask, match_kv_scatter

TO_KEYS_T = [0, 1, 3, 2]
HEADS_LAYOUT = [0, 2, 1, 3]


def _only_use(value: ir.Value, op_type: str) -> tuple[ir.Node, int] | None:
    uses = list(value.uses())
    if len(uses) != 1 or value.is_graph_output() or uses[0].node.op_type != op_type:
        return None
    return uses[0].node, uses[0].idx


def _perm(node: ir.Node | None) -> list[int] | None:
    return None if node is None else list(node.attributes.get_ints("perm", []) or [])


def _heads_reshape(x: ir.Value) -> ir.Node | None:
    """The Reshape when ``x`` is ``Transpose(Reshape(rows), [0, 2, 1, 3])``: heads split off a projection."""
    transpose = producer_op(x, "Transpose")
    if transpose is None or _perm(transpose) != HEADS_LAYOUT:
        return None
    return producer_op(transpose.inputs[0], "Reshape")


def _heads(value: ir.Value, axis: int) -> int | None:
    return static_dim(value.shape, axis, rank=4)


@dataclass
class _Attention:
    """One matched attention: the tensors GQA reads and the nodes whose outputs it replaces."""

    query: ir.Value  # [b, heads, s, d]
    key: ir.Value  # new keys [b, kv_heads, s, d]
    value: ir.Value  # new values [b, kv_heads, s, d]
    key_scatter: ir.Node
    value_scatter: ir.Node
    output_transpose: ir.Node  # [b, heads, s, d] -> [b, s, heads, d]
    scale: float
    heads: int
    kv_heads: int
    local_window: int  # GQA's local_window_size: -1, or how many keys a query sees (its own included)


class GroupQueryAttentionFusion(GraphPass):
    """Retained-state attention (scatter, scores, mask, softmax, probs@V) -> ``com.microsoft.GroupQueryAttention``."""

    name = "group-query-attention"
    emits = frozenset({(MS_DOMAIN, "GroupQueryAttention")})
    summary = "retained-state attention (K/V scatter, scores, causal mask, softmax, probs@V) -> com.microsoft GQA"

    # --- matching: each step returns what it found or refuses with the reason (``NoMatch``) ------------------------
    @staticmethod
    def _unrepeated(value: ir.Value) -> ir.Value:
        """``x`` for eager GQA's head repeat ``Reshape(Expand(Unsqueeze(x, 2)))``, else ``value``."""
        reshape = producer_op(value, "Reshape")
        expand = producer_op(reshape.inputs[0], "Expand") if reshape is not None else None
        unsqueeze = producer_op(expand.inputs[0], "Unsqueeze") if expand is not None else None
        return unsqueeze.inputs[0] if unsqueeze is not None and const_ints(unsqueeze.inputs[1]) == [2] else value

    @staticmethod
    def _mask_and_scores(add: ir.Node, position_ids: ir.Value) -> tuple[ir.Value, int]:
        """(scores, GQA's ``local_window_size``) when one operand of ``add`` is the retained-state causal mask."""
        reasons = []
        for scores, mask in (add.inputs, add.inputs[::-1]):
            try:
                return scores, match_additive_position_mask(mask, position_ids)
            except NoMatch as exc:
                reasons.append(str(exc))
        refuse(f"neither operand of the score Add is the retained-state causal mask ({reasons[0]}; {reasons[1]})")

    @staticmethod
    def _scaled(scores: ir.Value) -> tuple[ir.Value, float]:
        """(unscaled scores, scale) for ``Mul|Div(scores, c)``, else (scores, 1)."""
        scaling = scores.producer()
        if scaling is None or scaling.op_type not in ("Mul", "Div"):
            return scores, 1.0
        factor = scalar(scaling.inputs[1])
        require(factor is not None, f"the scores are scaled by {scaling.op_type} with a non-constant factor")
        require(factor != 0.0, "the scores are scaled by a zero constant")
        return scaling.inputs[0], factor if scaling.op_type == "Mul" else 1.0 / factor

    @staticmethod
    def _grouped(node: ir.Node | None) -> tuple[ir.Node, ir.Value]:
        """(MatMul, its A before grouping) for ``MatMul(A, B)`` or ``Reshape(MatMul(Reshape(A), B))``."""
        what = "the unscaled scores are not computed by a MatMul (or a grouped Reshape(MatMul(Reshape)))"
        node = require(node, what)
        if node.op_type == "MatMul":
            return node, node.inputs[0]
        require(node.op_type == "Reshape", f"{what}: {node.op_type}")
        matmul = require(producer_op(node.inputs[0], "MatMul"), f"{what}: a Reshape of {node.inputs[0].name}")
        rows = require(producer_op(matmul.inputs[0], "Reshape"), "the grouped score MatMul's query is not reshaped")
        return matmul, rows.inputs[0]

    @staticmethod
    def _probs_times_values(softmax: ir.Node) -> tuple[ir.Node, ir.Value]:
        """(probs @ V MatMul, its result before grouping) for the only use of the Softmax."""
        use = list(softmax.outputs[0].uses())[0]
        if use.node.op_type == "MatMul" and use.idx == 0:
            return use.node, use.node.outputs[0]
        rows = require(_only_use(softmax.outputs[0], "Reshape"), "the Softmax is not read by a MatMul as probs @ V")
        matmul = require(_only_use(rows[0].outputs[0], "MatMul"), "the grouped probs are not read by a MatMul")
        require(matmul[1] == 0, "the grouped probs are the MatMul's second operand, not probs @ V")
        back = require(_only_use(matmul[0].outputs[0], "Reshape"), "the grouped probs @ V is not reshaped back")
        return matmul[0], back[0].outputs[0]

    def _match(self, softmax: ir.Node, position_ids: ir.Value) -> _Attention:
        """The attention ending in ``softmax``, or ``NoMatch`` saying which part is not GQA's form."""
        add = require(producer_op(softmax.inputs[0], "Add"), "the Softmax does not read scores + mask (an Add)")
        require(len(list(softmax.outputs[0].uses())) == 1, "the Softmax's probabilities have more than one reader")
        scores, window = self._mask_and_scores(add, position_ids)
        scores, scale = self._scaled(scores)
        score_matmul, query = self._grouped(scores.producer())
        keys_t = producer_op(score_matmul.inputs[1], "Transpose")
        require(keys_t is not None and _perm(keys_t) == TO_KEYS_T, "the scores' keys are not Transpose(K, [0,1,3,2])")
        try:
            keys = match_kv_scatter(self._unrepeated(keys_t.inputs[0]))
        except NoMatch as exc:
            refuse(f"the keys are not the retained-state buffer: {exc}")
        probs_matmul, out = self._probs_times_values(softmax)
        try:
            values = match_kv_scatter(self._unrepeated(probs_matmul.inputs[1]))
        except NoMatch as exc:
            refuse(f"the values are not the retained-state buffer: {exc}")
        transpose = _only_use(out, "Transpose")
        require(
            transpose is not None and _perm(transpose[0]) == HEADS_LAYOUT,
            "probs @ V is not transposed back to [b, s, heads, d] (Transpose [0,2,1,3]) by its only reader",
        )
        heads, head_dim, kv_heads = _heads(query, 1), _heads(query, 3), _heads(keys.new, 1)
        require(heads and head_dim, f"the query's heads or head size are not static (shape {query.shape})")
        require(kv_heads, f"the new keys' head count is not static (shape {keys.new.shape})")
        require(heads % kv_heads == 0, f"{heads} query heads are not a multiple of {kv_heads} KV heads")
        # GQA has one head size and one KV head count for K and V alike
        same = (_heads(keys.new, 3), _heads(values.new, 1), _heads(values.new, 3))
        require(
            same == (head_dim, kv_heads, head_dim),
            f"K and V differ in head count or head size from the query's (keys {keys.new.shape}, values "
            f"{values.new.shape}, query {query.shape})",
        )
        return _Attention(
            query, keys.new, values.new, keys.node, values.node, transpose[0], scale, heads, kv_heads, window
        )

    # --- rewriting ------------------------------------------------------------------------------------------------
    @staticmethod
    def _unrotated(query: ir.Value, key: ir.Value) -> tuple[ir.Value, ir.Value, ir.Value | None, ir.Value | None]:
        """Q and K before a shared com.microsoft.RotaryEmbedding (and its cos/sin tables), or as given."""
        rq, rk = producer_op(query, "RotaryEmbedding", MS_DOMAIN), producer_op(key, "RotaryEmbedding", MS_DOMAIN)
        if rq is None or rk is None or rq.inputs[2:4] != rk.inputs[2:4]:
            return query, key, None, None
        for node in (rq, rk):
            if node.attributes.get_int("interleaved", 0) or node.attributes.get_int("rotary_embedding_dim", 0):
                return query, key, None, None
        return rq.inputs[0], rk.inputs[0], rq.inputs[2], rq.inputs[3]

    @staticmethod
    def _packed(parts: tuple[ir.Value, ir.Value, ir.Value], heads: int, kv_heads: int) -> ir.Value | None:
        """``qkv [b, s, (heads + 2 kv_heads) * d]`` when q, k, v are the parts of Split(Transpose(Reshape(qkv)))."""
        split = parts[0].producer()
        if split is None or split.op_type != "Split" or list(split.outputs) != list(parts):
            return None
        if split.attributes.get_int("axis", 0) != 1 or const_ints(split.inputs[1]) != [heads, kv_heads, kv_heads]:
            return None
        reshape = _heads_reshape(split.inputs[0])
        source = reshape.inputs[0] if reshape is not None else None
        return source if source is not None and source.shape is not None and source.shape.rank() == 3 else None

    @staticmethod
    def _as_rows(x: ir.Value, new_nodes: list[ir.Node], flat: ir.Value) -> ir.Value:
        """``x [b, n, s, d]`` as ``[b, s, n * d]``: the projection it was reshaped from, else Transpose + Reshape."""
        reshape = _heads_reshape(x)
        if reshape is not None and reshape.inputs[0].shape is not None and reshape.inputs[0].shape.rank() == 3:
            return reshape.inputs[0]
        back = ir.node("Transpose", [x], {"perm": HEADS_LAYOUT})
        rows = ir.node("Reshape", [back.outputs[0], flat])
        new_nodes += [back, rows]
        return rows.outputs[0]

    @staticmethod
    def _lengths(graph: ir.Graph, position_ids: ir.Value, input_ids: ir.Value, ctx_len: int) -> dict[str, ir.Value]:
        """GQA's ``seqlens_k`` [b] / ``total_sequence_length`` [] (int32) and ``real`` [b, s, 1] from the positions."""
        nodes: list[ir.Node] = []

        def add(op: str, inputs: list[ir.Value], **attrs) -> ir.Value:
            nodes.append(ir.node(op, inputs, attrs))
            return nodes[-1].outputs[0]

        def constant(values, dtype) -> ir.Value:
            nodes.append(const(values, dtype))
            return nodes[-1].outputs[0]

        zero, one = constant([0], np.int64), constant([1], np.int64)
        seq = add("Shape", [input_ids], start=1, end=2)  # [1]
        first = add("Slice", [position_ids, zero, one, one])  # [b, 1]
        batch_start = add("ReduceMax", [first], keepdims=1)  # [1, 1]
        start = add("Where", [add("GreaterOrEqual", [first, zero]), first, batch_start])
        last_start = add("Sub", [constant([ctx_len], np.int64), seq])
        start = add("Max", [add("Min", [start, last_start]), zero])
        seqlens = add("Sub", [add("Add", [start, seq]), one])  # [b, 1]
        seqlens_k = add("Cast", [add("Reshape", [seqlens, constant([-1], np.int64)])], to=ir.DataType.INT32)
        total = add("Cast", [add("Add", [add("ReduceMax", [seqlens], keepdims=0), one])], to=ir.DataType.INT32)
        total = add("Reshape", [total, constant([], np.int64)])  # scalar
        real = add("Unsqueeze", [add("GreaterOrEqual", [position_ids, zero]), constant([2], np.int64)])
        for value, name in ((seqlens_k, "gqa_seqlens_k"), (total, "gqa_total_sequence_length"), (real, "gqa_real")):
            value.name = name
        prepend(graph, nodes)
        return {"seqlens_k": seqlens_k, "total": total, "real": real}

    def _inputs(
        self, attn: _Attention, real: ir.Value, flat: ir.Value, new_nodes: list[ir.Node]
    ) -> tuple[list[ir.Value | None], ir.Value | None, ir.Value | None]:
        """GQA's query/key/value (key and value None when packed) and rotary cos/sin tables (None: no rotary).

        K and V (all of a packed QKV) are zeroed on padding rows, whose slots GQA may read as ``0 * value``."""
        query, key, cos, sin = self._unrotated(attn.query, attn.key)
        zero = const(np.zeros((), dtype=(attn.value.dtype or ir.DataType.FLOAT).numpy()))
        new_nodes.append(zero)

        def zeroed(x: ir.Value) -> ir.Value:
            new_nodes.append(ir.node("Where", [real, x, zero.outputs[0]]))
            return new_nodes[-1].outputs[0]

        packed = self._packed((query, key, attn.value), attn.heads, attn.kv_heads)
        if packed is not None:
            return [zeroed(packed), None, None], cos, sin
        q = self._as_rows(query, new_nodes, flat)
        k = zeroed(self._as_rows(key, new_nodes, flat))
        v = zeroed(self._as_rows(attn.value, new_nodes, flat))
        return [q, k, v], cos, sin

    def call(self, model: ir.Model) -> CountedResult:
        graph = model.graph
        position_ids, input_ids = input_by_name(graph, POSITION_IDS), input_by_name(graph, INPUT_IDS)
        if position_ids is None or input_ids is None:
            result = self.result(model, fused=0)
            result.misses = [f"the graph has no {POSITION_IDS} or {INPUT_IDS} input: not a retained-state graph"]
            return result
        matches, misses = [], []
        for softmax in (n for n in graph if n.op_type == "Softmax"):
            try:
                matches.append(self._match(softmax, position_ids))
            except NoMatch as exc:  # outside the matched form: softcap, a bias, a MoE router, ...
                misses.append(f"Softmax {softmax.name or '(unnamed)'}: {exc}")
        unfused = len(misses)
        if not matches:  # a count of what was left is no change: the graph is as it was
            result = self.result(model, fused=0, softmax_left_unfused=unfused)
            result.modified, result.misses = False, misses
            return result
        ctx_len = matches[0].key_scatter.inputs[0].shape[2]
        lengths = self._lengths(graph, position_ids, input_ids, ctx_len)
        flat = const([0, 0, -1], np.int64)
        prepend(graph, [flat])
        packed_count = rotary_count = 0
        for attn in matches:
            new_nodes: list[ir.Node] = []
            qkv, cos, sin = self._inputs(attn, lengths["real"], flat.outputs[0], new_nodes)
            packed_count += qkv[1] is None
            rotary = cos is not None
            rotary_count += rotary
            gqa = ir.node(
                "GroupQueryAttention",
                [
                    *qkv,
                    attn.key_scatter.inputs[0],
                    attn.value_scatter.inputs[0],
                    lengths["seqlens_k"],
                    lengths["total"],
                    *((cos, sin) if rotary else ()),
                ],
                {
                    "num_heads": attn.heads,
                    "kv_num_heads": attn.kv_heads,
                    "scale": float(attn.scale),
                    "do_rotary": int(rotary),
                    "rotary_interleaved": 0,
                    "local_window_size": attn.local_window,
                },
                domain=MS_DOMAIN,
                num_outputs=3,
                name=derived_name(attn.output_transpose, "gqa"),
            )
            new_nodes.append(gqa)
            out = attn.output_transpose.outputs[0]
            ir.convenience.replace_nodes_and_values(
                graph,
                attn.output_transpose,
                [attn.output_transpose, attn.key_scatter, attn.value_scatter],
                new_nodes,
                [out, attn.key_scatter.outputs[0], attn.value_scatter.outputs[0]],
                list(gqa.outputs),
            )
            # replace_nodes_and_values copied the 4D [b, s, heads, d] shape; GQA's output is [b, s, heads * d]
            gqa.outputs[0].shape = None
        RemoveUnusedNodesPass()(model)  # score chains, scatter indices, rotary nodes nothing reads now
        model.opset_imports.setdefault(MS_DOMAIN, 1)
        result = self.result(
            model,
            fused=len(matches),
            packed_qkv=packed_count,
            rotary_absorbed=rotary_count,
            softmax_left_unfused=unfused,
        )
        result.misses = misses
        return result

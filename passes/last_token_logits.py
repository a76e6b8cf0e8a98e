"""Compute the LM head only for each row's last valid token: ``logits`` becomes ``[b, 1, V]``.

Why: greedy decoding reads one logits row per sequence, but a vanilla graph projects every prompt position onto the
vocabulary. For a 128-token SmolLM2 prefill that is 128 x 576 x 49152 multiply-adds (~7 GFLOP, most of the prefill)
and a 25 MB output, all thrown away but one row.

How: on the retained-state contract the last valid token of a row in a chunk is the one with the largest
``position_ids`` (padding is -1, right-aligned), so the hidden state entering the LM head is reduced with
``GatherND(hidden, ArgMax(position_ids, axis=1), batch_dims=1)`` before the head. Element-wise ops between the head and
the output (logit scaling, soft-capping) follow the smaller shape unchanged.

Contract change (hence an option, not a default by itself): ``logits`` is ``[b, 1, V]`` for every sequence length.
A runtime must read ``logits[:, 0]`` (row i's last valid token) when ``s > 1``; decode (``s = 1``) is unchanged. The
ORT backend accepts both shapes (see ``backends/ort.py``).

Speculative decoding (``positions=k + 1``, compile option ``num_speculative_tokens=k``): a verification run feeds
``k + 1`` tokens per row and needs the logits of all of them. The pass then keeps the ``n = min(s, k + 1)`` positions
ending at each row's last valid token: ``logits`` is ``[b, n, V]``, ``logits[i, -1]`` is row i's last valid token and
``logits[i, n - 1 - j]`` the token ``j`` columns before it (indices before a row's first column repeat its first
column). Decode (``s = 1``) stays ``[b, 1, V]``; prefill reads ``logits[:, -1]``. The model's metadata records the
count (``qgraph.logits_positions``) so a session knows the layout without reading the graph's nodes.
"""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes import PreconditionError

from qgraph.contract import ATTENTION_MASK, LOGITS, LOGITS_POSITIONS_METADATA, POSITION_IDS
from qgraph.pass_manager import CountedResult, GraphPass

HEAD_OPS = {("", "MatMul"), ("ai.onnx", "MatMul"), ("com.microsoft", "MatMulNBits")}
# Ops allowed between the LM head and the logits output: shape-agnostic element-wise ops on the head's result.
PASS_THROUGH = {"Add", "Mul", "Div", "Sub", "Tanh", "Cast", "Identity", "Softcap"}
MARK = "last_token_logits"


def _is_const(value: ir.Value | None) -> bool:
    return value is not None and value.const_value is not None


def find_lm_head(graph: ir.Graph) -> ir.Node | None:
    """The MatMul (or MatMulNBits) with a constant weight from which ``logits`` is computed element-wise."""
    logits = next((o for o in graph.outputs if o.name == LOGITS), None)
    node = logits.producer() if logits is not None else None
    while node is not None:
        if (node.domain, node.op_type) in HEAD_OPS:
            weight = node.inputs[1]
            if _is_const(weight) or (
                weight is not None and weight.producer() is not None and weight.producer().op_type == "Transpose"
            ):
                return node
            return None
        if node.op_type not in PASS_THROUGH:
            return None
        # follow the non-constant operand
        dynamic = [v for v in node.inputs if v is not None and not _is_const(v)]
        if len(dynamic) != 1 or dynamic[0].producer() is None:
            return None
        node = dynamic[0].producer()
    return None


class LastTokenLogits(GraphPass):
    """Gather each row's last valid hidden state before the LM head (``logits`` -> ``[b, 1, V]``)."""

    name = "last-token-logits"
    summary = (
        "LM head on each row's last valid token only (largest position_ids); logits [b, 1, V] "
        "(positions=n: the last min(s, n) tokens of each row, for speculative verification)"
    )

    def __init__(self, positions: int = 1):
        if isinstance(positions, bool) or not isinstance(positions, int) or positions < 1:
            raise ValueError(f"positions must be an integer >= 1, got {positions!r}")
        self.positions = positions

    def requires(self, model: ir.Model) -> None:
        names = {v.name for v in model.graph.inputs}
        if POSITION_IDS not in names or ATTENTION_MASK in names:
            raise PreconditionError(f"needs the retained-state contract ({POSITION_IDS} input, no {ATTENTION_MASK})")

    def call(self, model: ir.Model) -> CountedResult:
        graph = model.graph
        head = find_lm_head(graph)
        if head is None:
            raise PreconditionError(
                f"no LM head found: '{LOGITS}' is not a constant-weight MatMul (+ element-wise ops)"
            )
        if head.name.endswith(MARK) or any(n.name.startswith(MARK) for n in graph):
            return self.result(model, gathered=0)  # already applied
        hidden = head.inputs[0]
        position_ids = next(v for v in graph.inputs if v.name == POSITION_IDS)
        argmax = ir.node("ArgMax", [position_ids], {"axis": 1, "keepdims": 1}, name=f"{MARK}_argmax")
        if self.positions == 1:
            gather = ir.node("GatherND", [hidden, argmax.outputs[0]], {"batch_dims": 1}, name=f"{MARK}_gather")
            unsqueeze = ir.node("Unsqueeze", [gather.outputs[0], _ints(graph, "axes", [1])], name=f"{MARK}_unsqueeze")
            new_nodes = [argmax, gather, unsqueeze]
            kept: int | str = 1
        else:
            new_nodes = [argmax, *self._last_positions(graph, hidden, argmax.outputs[0])]
            unsqueeze = new_nodes[-1]
            kept = "logits_positions"
            model.metadata_props[LOGITS_POSITIONS_METADATA] = str(self.positions)
        graph.insert_before(head, new_nodes)
        head.replace_input_with(0, unsqueeze.outputs[0])
        if hidden.shape is not None and len(hidden.shape) == 3:
            unsqueeze.outputs[0].shape = ir.Shape([hidden.shape[0], kept, hidden.shape[2]])
            unsqueeze.outputs[0].type = hidden.type
        logits = next(o for o in graph.outputs if o.name == LOGITS)
        if logits.shape is not None and len(logits.shape) == 3:
            logits.shape = ir.Shape([logits.shape[0], kept, logits.shape[2]])
        # downstream intermediate shapes were inferred for [b, s, V]: clear them, ORT infers again
        node = logits.producer()
        while node is not None and node is not head:
            for out in node.outputs:
                if out is not logits:
                    out.shape = None
            dynamic = [v for v in node.inputs if v is not None and not _is_const(v)]
            node = dynamic[0].producer() if dynamic else None
        head.outputs[0].shape = None if head.outputs[0] is not logits else head.outputs[0].shape
        return self.result(model, gathered=1)

    def _last_positions(self, graph: ir.Graph, hidden: ir.Value, last: ir.Value) -> list[ir.Node]:
        """``hidden[i, last_i - n + 1 .. last_i]`` (indices clamped at 0) with ``n = min(s, positions)``: [b, n, H]."""
        nodes: list[ir.Node] = []

        def add(op: str, inputs: list[ir.Value], **attrs) -> ir.Value:
            nodes.append(ir.node(op, inputs, attrs, name=f"{MARK}_{op.lower()}_{len(nodes)}"))
            return nodes[-1].outputs[0]

        zero, one = _ints(graph, "zero", 0), _ints(graph, "one", 1)
        seq = add("Shape", [hidden], start=1, end=2)  # [1]
        count = add("Min", [seq, _ints(graph, "positions", [self.positions])])  # [1]: n
        offsets = add("Range", [zero, add("Squeeze", [count]), one])  # [n]: 0 .. n-1
        first = add("Sub", [last, add("Sub", [count, one])])  # [b, 1]: last - (n - 1)
        index = add("Max", [add("Add", [first, add("Unsqueeze", [offsets, _ints(graph, "axes0", [0])])]), zero])
        index = add("Unsqueeze", [index, _ints(graph, "axes2", [2])])  # [b, n, 1]
        add("GatherND", [hidden, index], batch_dims=1)  # [b, n, H]
        return nodes

    def ensures(self, model: ir.Model) -> None:
        logits = next(o for o in model.graph.outputs if o.name == LOGITS)
        if self.positions == 1 and logits.shape is not None and len(logits.shape) == 3 and logits.shape[1] != 1:
            raise ValueError(f"logits shape is {logits.shape}, expected [b, 1, V]")


def _ints(graph: ir.Graph, name: str, values: int | list[int]) -> ir.Value:
    """An int64 initializer of this pass (a scalar for an int), registered once."""
    full = f"{MARK}_{name}"
    if full in graph.initializers:
        return graph.initializers[full]
    shape = ir.Shape([]) if isinstance(values, int) else ir.Shape([len(values)])
    value = ir.Value(name=full, shape=shape, type=ir.TensorType(ir.DataType.INT64))
    value.const_value = ir.tensor(values, dtype=ir.DataType.INT64, name=full)
    graph.register_initializer(value)
    return value

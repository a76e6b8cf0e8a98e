"""Node forms of the retained-state contract that one pass writes and a later pass reads: builder and matcher together.

``kv-retained-state`` writes them; ``group-query-attention`` (and any later fusion) reads them. Keeping the builder
next to its matcher means the two cannot drift apart: a test builds each form and matches it back.

- **Position mask**: key slot ``k`` is visible to a query at position ``p`` iff ``k <= p`` and, for a sliding window
  ``w``, ``k > p - w``: ``LessOrEqual(slots, q)`` [``And Greater(slots, Sub(q, w))``] with ``q =
  Unsqueeze(position_ids, [1, 3])``; additive masks are ``Where(visible, 0, hidden)``.
- **KV scatter**: ``ScatterElements(past, Expand(Unsqueeze(position_ids, [1, 3]), shape), Where(real, new, 0),
  axis=2)``, its output the buffer's ``_RetainedState``; ``real = Unsqueeze(position_ids >= 0, [1, 3])`` so padding
  rows write zeros.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from qgraph.graph_utils import const, const_ints, producer_op, scalar
from qgraph.matching import require

# Additive masks hide a key with a large negative number (HF: the dtype's minimum; older code: -1e4 or -1e9).
HIDDEN_BELOW = -1.0e4
_QUERY_AXES = [1, 3]  # position_ids [b, s] -> [b, 1, s, 1]: broadcasts against [b, heads, s, keys | head_dim]


# -- position mask -----------------------------------------------------------------------------------------------


class PositionMasks:
    """Builds the masks of one graph from ``position_ids``; the slot table and the causal test are shared by all.

    ``nodes`` holds every node built so far (they read only graph inputs and constants: prepend them).
    """

    def __init__(self, ctx_len: int, position_ids: ir.Value):
        slots = const(np.arange(ctx_len, dtype=np.int64), name="kv_slot_positions")
        axes = const(_QUERY_AXES, np.int64)
        query = ir.node("Unsqueeze", [position_ids, axes.outputs[0]])  # [b, 1, s, 1]
        causal = ir.node("LessOrEqual", [slots.outputs[0], query.outputs[0]])  # [b, 1, s, ctx_len]
        causal.outputs[0].name = "kv_visible"
        self.nodes: list[ir.Node] = [slots, axes, query, causal]
        self._slots, self._query = slots.outputs[0], query.outputs[0]
        self._visible: dict[int | None, ir.Value] = {None: causal.outputs[0]}
        self._additive: dict[tuple, ir.Value] = {}

    def visible(self, window: int | None) -> ir.Value:
        """Boolean ``[b, 1, s, ctx_len]``: which key slots each query sees (``window`` None: plain causal)."""
        if window not in self._visible:
            size = const(np.array(window, np.int64))
            oldest = ir.node("Sub", [self._query, size.outputs[0]])
            inside = ir.node("Greater", [self._slots, oldest.outputs[0]])
            both = ir.node("And", [self._visible[None], inside.outputs[0]])
            both.outputs[0].name = f"kv_visible_window_{window}"
            self.nodes += [size, oldest, inside, both]
            self._visible[window] = both.outputs[0]
        return self._visible[window]

    def additive(self, window: int | None, dtype: ir.DataType, hidden: float) -> ir.Value:
        """``Where(visible, 0, hidden)`` in ``dtype``: the additive form of the same mask."""
        key = (window, dtype, hidden)
        if key not in self._additive:
            zero = const(np.zeros((), dtype.numpy()))
            blocked = const(np.array(hidden, dtype.numpy()))
            where = ir.node("Where", [self.visible(window), zero.outputs[0], blocked.outputs[0]])
            suffix = f"_window_{window}" if window is not None else ""
            where.outputs[0].name = f"kv_additive_mask_{dtype.name.lower()}{suffix}"
            self.nodes += [zero, blocked, where]
            self._additive[key] = where.outputs[0]
        return self._additive[key]


def match_additive_position_mask(mask: ir.Value, position_ids: ir.Value) -> int:
    """The window of an additive ``PositionMasks`` mask: -1 for plain causal, ``w`` for a sliding window of ``w``
    keys (its own included); raises ``NoMatch`` saying which part differs."""
    where = require(producer_op(mask, "Where"), "the mask is not computed by a Where")
    require(scalar(where.inputs[1]) == 0.0, "the mask's visible value is not the constant 0")
    blocked = scalar(where.inputs[2])
    require(blocked is not None, "the mask's hidden value is not a constant scalar")
    require(blocked <= HIDDEN_BELOW, f"the mask's hidden value {blocked:g} does not hide a key (not <= -1e4)")
    window = -1
    visible = producer_op(where.inputs[0], "LessOrEqual")
    both = producer_op(where.inputs[0], "And")
    if both is not None:
        visible = require(
            producer_op(both.inputs[0], "LessOrEqual"), "the windowed mask's first term is not LessOrEqual"
        )
        inside = require(producer_op(both.inputs[1], "Greater"), "the windowed mask's second term is not Greater")
        oldest = require(producer_op(inside.inputs[1], "Sub"), "the window's lower bound is not Sub(query, w)")
        width = scalar(oldest.inputs[1])
        require(width is not None and width >= 1, "the window's width is not a constant >= 1")
        require(inside.inputs[0] is visible.inputs[0], "the window and the causal test compare different slots")
        require(oldest.inputs[0] is visible.inputs[1], "the window and the causal test read different queries")
        window = int(width)
    require(visible, "the mask's condition is neither LessOrEqual(slots, q) nor And(causal, window)")
    require(const_ints(visible.inputs[0]) is not None, "the key slots the mask compares are not constant")
    query = producer_op(visible.inputs[1], "Unsqueeze")
    require(query is not None and query.inputs[0] is position_ids, "the mask's queries are not position_ids")
    return window


# -- KV scatter --------------------------------------------------------------------------------------------------


def real_tokens(position_ids: ir.Value) -> tuple[list[ir.Node], ir.Value]:
    """``position_ids >= 0`` as ``[b, 1, s, 1]`` (which rows of a step are tokens, not padding) and its nodes."""
    zero = const(np.array(0, np.int64))
    real = ir.node("GreaterOrEqual", [position_ids, zero.outputs[0]])
    axes = const(_QUERY_AXES, np.int64)
    shaped = ir.node("Unsqueeze", [real.outputs[0], axes.outputs[0]])
    shaped.outputs[0].name = "kv_real_tokens"
    return [zero, real, axes, shaped], shaped.outputs[0]


def static_heads_and_head_dim(past: ir.Value) -> tuple[int, int] | None:
    """``(heads, head_dim)`` of a ``[b, heads, ctx, head_dim]`` KV buffer when both are static, else None."""
    dims = list(past.shape.dims) if past.shape is not None else []
    if len(dims) == 4 and isinstance(dims[1], int) and isinstance(dims[3], int):
        return dims[1], dims[3]
    return None


def build_kv_scatter(
    past: ir.Value, new: ir.Value, position_ids: ir.Value, real: ir.Value
) -> tuple[list[ir.Node], ir.Value]:
    """The step's K or V written into ``past`` at its positions (padding rows write zeros): nodes and the new buffer.

    Expand broadcasts ``[b, 1, s, 1]`` to the step's ``[b, heads, s, head_dim]``; with the buffer's static heads and
    head size the target is a constant ``[1, heads, 1, head_dim]``, one for every layer of that geometry (a single
    index tensor after CSE) instead of a runtime Shape + Expand per K and V of every layer.
    """
    axes = const(_QUERY_AXES, np.int64)
    where_to = ir.node("Unsqueeze", [position_ids, axes.outputs[0]])  # [b, 1, s, 1]
    static = static_heads_and_head_dim(past)
    new_shape = const([1, static[0], 1, static[1]], np.int64) if static else ir.node("Shape", [new])
    indices = ir.node("Expand", [where_to.outputs[0], new_shape.outputs[0]])
    nothing = const(np.zeros((), (new.dtype or past.dtype).numpy()))
    written = ir.node("Where", [real, new, nothing.outputs[0]])
    scatter = ir.node("ScatterElements", [past, indices.outputs[0], written.outputs[0]], attributes={"axis": 2})
    out = scatter.outputs[0]
    out.dtype, out.shape = past.dtype, past.shape
    return [axes, where_to, new_shape, indices, nothing, written, scatter], out


@dataclass(frozen=True)
class KVScatter:
    node: ir.Node  # the ScatterElements
    past: ir.Value  # the graph input it updates
    new: ir.Value  # the step's K or V, before padding rows are zeroed


def match_kv_scatter(present: ir.Value) -> KVScatter:
    """The ``build_kv_scatter`` form producing ``present``; raises ``NoMatch`` saying which part differs."""
    scatter = require(producer_op(present, "ScatterElements"), "the buffer is not written by ScatterElements")
    axis = scatter.attributes.get_int("axis", 0)
    require(axis in (2, -2), f"the KV scatter writes axis {axis}, not the sequence axis 2")
    past = scatter.inputs[0]
    require(past is not None and past.is_graph_input(), "the KV scatter's buffer is not a graph input")
    require(present.is_graph_output(), "the KV scatter's result is not a graph output (not retained state)")
    new = scatter.inputs[2]
    zeroing = producer_op(new, "Where")
    if zeroing is not None and scalar(zeroing.inputs[2]) == 0.0:
        new = zeroing.inputs[1]
    return KVScatter(scatter, past, new)

"""One Reshape + Transpose to the heads layout for q, k and v together, then the Split.

Why: a fused q/k/v projection (GPT-2's ``c_attn``, or ``merge-parallel-matmuls`` output) is split into q, k, v along
the last axis, and each part is then reshaped to ``[b, s, heads, head_dim]`` and transposed to ``[b, heads, s,
head_dim]``: three Reshapes and three Transposes (each a copy) per layer. Reshaping and transposing the fused tensor
once and splitting it along the heads axis gives the same three tensors with one Reshape, one Transpose and the Split.

Matched: ``Split(x, sizes, axis=-1)`` of a rank-3 ``x`` where every output feeds exactly one ``Reshape`` to a rank-4
shape with static ``[heads_i, head_dim]`` (one ``head_dim`` for all, ``sizes_i = heads_i * head_dim``) whose result
feeds exactly one ``Transpose(perm=[0, 2, 1, 3])``. The new Reshape's shape is ``[0, 0, sum(heads_i), head_dim]``
(0 copies a dimension). Graph inputs/outputs unchanged; idempotent (no Split of that form is left).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qgraph.graph_utils import add_initializer
from qgraph.pass_manager import CountedResult, GraphPass

HEADS_LAYOUT = [0, 2, 1, 3]


def _only_consumer(value: ir.Value, op_type: str) -> ir.Node | None:
    uses = list(value.uses())
    if len(uses) != 1 or value.is_graph_output():
        return None
    node, index = uses[0]
    return node if node.op_type == op_type and node.domain in ("", "ai.onnx") and index == 0 else None


def _rank(split: ir.Node) -> int | None:
    """Rank of the split tensor, from its own shape or its parts' (a rewrite may have left the input unshaped)."""
    for value in (split.inputs[0], *split.outputs):
        if value.shape is not None:
            return value.shape.rank()
    return None


def _split_sizes(split: ir.Node) -> list[int] | None:
    """The part sizes: the ``split`` input, or ``num_outputs`` equal parts of a static last dimension."""
    if len(split.inputs) > 1 and split.inputs[1] is not None:
        tensor = ir.convenience.get_const_tensor(split.inputs[1])
        return None if tensor is None else [int(v) for v in np.asarray(tensor.numpy()).reshape(-1)]
    parts = [out.shape[-1] if out.shape is not None else None for out in split.outputs]
    return parts if all(isinstance(p, int) for p in parts) else None


def _heads_layout(split: ir.Node) -> tuple[list[int], int, list[ir.Node], list[ir.Node]] | None:
    """``(heads per output, head_dim, reshapes, transposes)`` when ``split`` has the matched form, else None."""
    sizes = _split_sizes(split)
    axis = split.attributes.get_int("axis", 0)
    if sizes is None or _rank(split) != 3 or axis not in (-1, 2):
        return None
    heads, reshapes, transposes, head_dim = [], [], [], None
    for out in split.outputs:
        reshape = _only_consumer(out, "Reshape")
        if reshape is None:
            return None
        shape = reshape.outputs[0].shape
        if shape is None or shape.rank() != 4 or not isinstance(shape[2], int) or not isinstance(shape[3], int):
            return None
        transpose = _only_consumer(reshape.outputs[0], "Transpose")
        perm = transpose.attributes.get_ints("perm") if transpose is not None else None
        if perm is None or list(perm) != HEADS_LAYOUT or (head_dim is not None and shape[3] != head_dim):
            return None
        head_dim = shape[3]
        heads.append(shape[2])
        reshapes.append(reshape)
        transposes.append(transpose)
    if sizes != [h * head_dim for h in heads]:
        return None
    return heads, head_dim, reshapes, transposes


class SharedHeadTranspose(GraphPass):
    """``Split -> (Reshape -> Transpose) x n`` -> ``Reshape -> Transpose -> Split`` on the heads axis."""

    name = "shared-head-transpose"
    summary = "split q/k/v after one Reshape + Transpose to [b, heads, s, head_dim] instead of one per part"

    def call(self, model: ir.Model) -> CountedResult:
        graph = model.graph
        shared = removed = 0
        for split in [n for n in graph if n.op_type == "Split" and n.domain in ("", "ai.onnx")]:
            layout = _heads_layout(split)
            if layout is None:
                continue
            heads, head_dim, reshapes, transposes = layout
            base = split.name or f"head_split_{shared}"
            shape = add_initializer(graph, f"{base}_heads_shape", np.array([0, 0, sum(heads), head_dim], np.int64))
            sizes = add_initializer(graph, f"{base}_heads_sizes", np.array(heads, np.int64))
            reshape = ir.node("Reshape", [split.inputs[0], shape], name=f"{base}_heads")
            transpose = ir.node("Transpose", [reshape.outputs[0]], {"perm": HEADS_LAYOUT}, name=f"{base}_heads_t")
            new_split = ir.node(
                "Split", [transpose.outputs[0], sizes], {"axis": 1}, num_outputs=len(heads), name=f"{base}_heads_split"
            )
            graph.insert_after(split, [reshape, transpose, new_split])
            for old, new in zip(transposes, new_split.outputs, strict=True):
                new.shape, new.type = old.outputs[0].shape, old.outputs[0].type
                name = old.outputs[0].name if old.outputs[0].is_graph_output() else None
                ir.convenience.replace_all_uses_with(old.outputs[0], new, replace_graph_outputs=True)
                if name is not None:  # a graph output keeps its name
                    old.outputs[0].name, new.name = None, name
            for node in [*transposes, *reshapes, split]:
                graph.remove(node, safe=True)
            shared += 1
            removed += 2 * len(heads) - 2
        return self.result(model, splits_moved=shared, reshapes_transposes_removed=removed)

"""KV cache as fixed-size retained state, updated at ``position_ids``.

Turns a vanilla decoder export (``past_key_values.{i}.key|value`` grown by ``Concat`` each step, mask built from
``attention_mask``) into the retained-state contract (``qgraph.contract``, ``docs/design.md``):

- inputs ``input_ids``, ``position_ids`` (-1 = padding), ``past_key.{i}`` / ``past_value.{i}`` of static length
  ``ctx_len``; outputs ``logits``, ``past_key.{i}_RetainedState`` / ``past_value.{i}_RetainedState``;
- each ``Concat(past, new, axis=-2)`` becomes ``ScatterElements(past, position_ids, new, axis=2)``. Position -1
  (padding) writes zeros to the last slot, which no query attends until decode reaches it (and writes it first);
- every attention mask is rebuilt from ``position_ids``: key slot ``k`` is visible to a query at position ``p`` iff
  ``k <= p`` and, for a sliding-window mask of window ``w``, ``k > p - w``. So padding queries see nothing and
  nothing sees padding. Which masks exist and which window each keeps is *measured*: the part of the graph that
  computes each mask is run once on ONNX Runtime with a known ``attention_mask`` and the pattern read off its output
  (causal, sliding window, or something the pass names and refuses);
- a value computed from ``attention_mask`` that is not a mask but a bias per key (ALiBi built from the mask's
  cumulative sum) keeps its computation and reads an all-ones ``[batch, ctx_len]`` ``attention_mask``: in the
  retained buffer slot ``k`` holds position ``k``, which is what such a bias assumes of an unpadded sequence;
- the graph's own length arithmetic (``past_len + seq_len`` from ``Shape`` reads of the past inputs) is kept
  consistent by making those reads report a virtual past length ``ctx_len - seq_len``: total length = ``ctx_len``;
- a graph without a ``position_ids`` input (models whose forward takes none) gets one: the contract needs it.

Everything is found by graph structure and measurement: the pass names no model and fails with what it did not find.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import PostconditionError, PreconditionError
from onnx_ir.passes.common import RemoveUnusedNodesPass, TopologicalSortPass

from qgraph import contract
from qgraph.contract import ATTENTION_MASK, INPUT_IDS, POSITION_IDS
from qgraph.graph_utils import (
    SHAPE_ONLY_OPS,
    attr_int,
    const,
    consumers,
    data_dependents,
    evaluate,
    input_by_name,
    prepend,
    replace_all_uses,
)
from qgraph.pass_manager import CountedResult, GraphPass
from qgraph.passes.cleanup import fill_unknown_shapes
from qgraph.retained_forms import HIDDEN_BELOW, PositionMasks, build_kv_scatter, real_tokens


@dataclass
class KVAppend:
    """One per KV tensor: the vanilla past input and the ``Concat`` that appends the new step to it."""

    layer: int
    kind: str  # "key" or "value"
    past: ir.Value
    concat: ir.Node

    @property
    def new(self) -> ir.Value:
        return self.concat.inputs[1]


def find_kv_appends(graph: ir.Graph) -> list[KVAppend]:
    """Every vanilla past input with its append ``Concat``; raises ``PreconditionError`` naming what is missing."""
    appends = []
    for value in graph.inputs:
        layer_kind = contract.vanilla_past(value.name)
        if layer_kind is None:
            continue
        concats = [n for n in consumers(value) if n.op_type == "Concat"]
        rank = value.shape.rank() if value.shape is not None else None
        valid = [
            n
            for n in concats
            if len(n.inputs) == 2
            and n.inputs[0] is value
            and rank is not None
            and attr_int(n, "axis") in (rank - 2, -2)
        ]
        if len(valid) != 1:
            users = ", ".join(f"{n.op_type}({n.name})" for n in consumers(value)) or "nothing"
            raise PreconditionError(
                f"input {value.name} is not appended to by exactly one Concat(past, new, axis=-2) "
                f"(found {len(valid)}; its consumers: {users})"
            )
        appends.append(KVAppend(*layer_kind, value, valid[0]))
    if not appends:
        names = ", ".join(v.name or "?" for v in graph.inputs)
        raise PreconditionError(
            f"no {contract.VANILLA_PAST_PATTERN} inputs (graph inputs: {names}); not a vanilla decoder export with KV"
        )
    return sorted(appends, key=lambda a: (a.layer, a.kind != "key"))


def find_mask_values(graph: ir.Graph, attention_mask: ir.Value, input_ids: ir.Value) -> list[ir.Value]:
    """The attention-mask tensors where they meet the attention computation.

    A mask value depends on ``attention_mask``'s data and not on ``input_ids``'s; the ones we want are those consumed
    by a node that also reads something computed from ``input_ids`` (the scores). Data flow, not op names, decides:
    every layer's scores also depend on ``attention_mask`` through earlier layers, so "the Add before Softmax that
    depends on attention_mask" would wrongly catch them too.
    """
    from_mask = data_dependents(graph, [attention_mask])
    from_ids = data_dependents(graph, [input_ids])
    frontier: dict[ir.Value, None] = {}
    for node in graph:
        if not any(v in from_ids for v in node.inputs if v is not None):
            continue
        for v in node.inputs:
            if v is not None and v in from_mask and v not in from_ids:
                frontier[v] = None
    return list(frontier)


def find_shape_masks(graph: ir.Graph, attention_mask: ir.Value, input_ids: ir.Value) -> list[ir.Value]:
    """Candidate masks computed from tensor *shapes* alone, where they meet the attention computation.

    Some models build (part of) their mask from a constant causal table sliced by ``past_len`` and ``seq_len`` (local
    attention windows, older causal buffers). Under retained state those lengths are virtual, so such a mask must be
    rebuilt from ``position_ids`` too. Candidates are boolean or float values read next to something computed from
    ``input_ids`` whose data depends on no graph input, only on ``Shape`` reads; measuring them
    (``classify_attention_terms``) tells masks from everything else of that kind.
    """
    from_ids = data_dependents(graph, [input_ids])
    from_inputs = data_dependents(graph, list(graph.inputs))
    shape_reads = [out for node in graph if node.op_type in SHAPE_ONLY_OPS for out in node.outputs]
    from_shapes = data_dependents(graph, shape_reads)
    kinds = {ir.DataType.BOOL, ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE}
    found: dict[ir.Value, None] = {}
    for node in graph:
        if not any(v in from_ids for v in node.inputs if v is not None):
            continue
        for v in node.inputs:
            if v is not None and v in from_shapes and v not in from_inputs and v.dtype in kinds:
                if v.shape is None or v.shape.rank() >= 2:
                    found[v] = None
    return [v for v in found if v is not attention_mask]


@dataclass
class AttentionTerm:
    """A value computed from ``attention_mask`` or from shapes alone (not from ``input_ids``) where it meets the
    model's activations.

    ``kind`` is ``"mask"`` (hides keys: boolean, or additive 0 / ``hidden``) or ``"key_bias"`` (a float added per key,
    the same for every query, e.g. ALiBi). A mask with a ``window`` hides keys ``window`` or more positions back.
    """

    value: ir.Value
    kind: str
    window: int | None = None
    hidden: float | None = None  # additive masks: the value that hides a key
    padding_only: bool = False  # hides nothing when nothing is padding: causality comes from elsewhere (or nowhere)


def probe_feeds(graph: ir.Graph, seq_len: int, past_len: int) -> dict[str, np.ndarray]:
    """Inputs of a vanilla decoder for one unpadded row: ``seq_len`` new tokens after ``past_len`` cached ones."""
    feeds: dict[str, np.ndarray] = {}
    total = past_len + seq_len
    for value in graph.inputs:
        name, dtype = value.name or "", value.dtype.numpy() if value.dtype is not None else np.int64
        if name == INPUT_IDS:
            feeds[name] = np.zeros((1, seq_len), dtype)
        elif name == POSITION_IDS:
            feeds[name] = np.arange(past_len, total, dtype=dtype)[None]
        elif name == ATTENTION_MASK:
            feeds[name] = np.ones((1, total), dtype)
        elif contract.vanilla_past(name) and value.shape is not None:
            dims = [d if isinstance(d, int) else 1 for d in value.shape.dims]
            dims[-2] = past_len
            feeds[name] = np.zeros(dims, dtype)
    return feeds


def _ranges(row: np.ndarray) -> str:
    """``[0..3, 7]``: the visible key slots of one mask row, as ranges."""
    keys, parts, start = np.flatnonzero(row).tolist(), [], None
    for i, k in enumerate(keys):
        start = k if start is None else start
        if i + 1 == len(keys) or keys[i + 1] != k + 1:
            parts.append(f"{start}..{k}" if k > start else f"{k}")
            start = None
    return "[" + ", ".join(parts) + "]"


def _mask_window(value: ir.Value, visible: np.ndarray, past_len: int) -> int | None:
    """The sliding window of a mask (None: plain causal), from its visible keys ``[rows, seq | 1, total]``.

    An all-visible mask (padding only, causality applied elsewhere) counts as causal: its replacement adds the
    causality the rest of the graph can no longer compute from virtual lengths.
    """
    seq_len = visible.shape[2] - past_len
    if visible.all():
        return None
    if visible.shape[1] != seq_len:
        raise PreconditionError(
            f"attention mask {value.name} has {visible.shape[1]} query rows for {seq_len} queries; a mask that "
            "does not vary by query cannot be rebuilt from position_ids"
        )
    if not (visible == visible[:1]).all():
        raise PreconditionError(f"attention mask {value.name} differs between heads or batch rows of one sequence")
    keys = np.arange(visible.shape[2])
    windows, full_rows, fits = set(), [], True
    for i, row in enumerate(visible[0]):
        q = past_len + i
        causal = keys <= q
        if (row == causal).all():
            full_rows.append(q)
            continue
        w = int(row.sum())
        fits = fits and w >= 1 and bool((row == (causal & (keys > q - w))).all())
        windows.add(w)
    if not fits or len(windows) > 1 or windows and any(q + 1 > min(windows) for q in full_rows):
        seen = "; ".join(
            f"the query at position {past_len + i} sees keys {_ranges(r)}" for i, r in enumerate(visible[0])
        )
        raise PreconditionError(
            f"attention mask {value.name} is neither causal nor one causal sliding window ({seen}); the pass can "
            "only rebuild those two patterns from position_ids"
        )
    return windows.pop() if windows else None


def classify_attention_terms(
    model: ir.Model, values: list[ir.Value], ctx_len: int, seq_len: int = 2, optional: frozenset = frozenset()
) -> list[AttentionTerm]:
    """Measure what each ``attention_mask``-derived value is, by computing it for one row of ``ctx_len`` tokens.

    Probing at total length ``ctx_len`` (the last ``seq_len`` tokens as queries) shows exactly the windows that cut
    inside the retained buffer: a window of ``ctx_len`` or more never hides a slot and is plain causal here.
    Values in ``optional`` (shape-derived candidates) are left out when they turn out not to span the key axis.
    """
    seq_len = min(seq_len, ctx_len - 1)
    past_len = ctx_len - seq_len
    if not values:
        return []
    try:
        arrays = evaluate(model, values, probe_feeds(model.graph, seq_len, past_len))
    except Exception as exc:  # ORT or a missing feed: say which values could not be measured
        names = ", ".join(v.name or "?" for v in values)
        raise PreconditionError(
            f"could not compute the attention-mask values {names} for one row of {ctx_len} tokens: {exc}"
        ) from None  # the pass manager reports a chained cause instead of this message
    terms = []
    for value, array in zip(values, arrays, strict=True):
        array = np.asarray(array)
        if array.ndim < 2 or array.shape[-1] != ctx_len or array.shape[-2] not in (1, seq_len):
            if value in optional:
                continue
            raise PreconditionError(
                f"value {value.name} is computed from attention_mask and meets the activations, but its last axis "
                f"is not the key axis (probe shape {array.shape} for {ctx_len} keys); the pass knows masks and "
                "per-key biases only"
            )
        rows = array.reshape(-1, *array.shape[-2:])
        if array.dtype == np.bool_:
            terms.append(AttentionTerm(value, "mask", _mask_window(value, rows, past_len), padding_only=rows.all()))
            continue
        hidden = rows <= HIDDEN_BELOW
        if hidden.any() or not rows.any():  # all zeros: an additive mask that hides nothing here
            hidden_value = float(rows.min()) if hidden.any() else float(np.finfo(rows.dtype).min)
            if not ((rows == 0) | (rows == hidden_value)).all():
                raise PreconditionError(
                    f"value {value.name} mixes a mask (entries {hidden_value:g}) with a bias (other non-zero "
                    "entries); the pass rebuilds masks and keeps per-key biases, but not both in one value"
                )
            window = _mask_window(value, rows == 0, past_len)
            terms.append(AttentionTerm(value, "mask", window, hidden_value, padding_only=(rows == 0).all()))
        elif (rows == rows[:, :1]).all():
            terms.append(AttentionTerm(value, "key_bias"))
        else:
            raise PreconditionError(
                f"value {value.name} is a bias computed from attention_mask that differs between queries; only a "
                "bias per key (the same for every query, like ALiBi) can be kept without attention_mask"
            )
    return terms


class KVRetainedState(GraphPass):
    """Vanilla KV Concat -> fixed ``ctx_len`` buffers scattered at ``position_ids``; mask from ``position_ids``."""

    name = "kv-retained-state"
    summary = "KV cache as fixed-size retained state updated at position_ids; mask derived from position_ids"

    def __init__(self, ctx_len: int = 128):
        if int(ctx_len) < 2:
            raise ValueError(f"ctx_len must be at least 2, got {ctx_len}")
        self.ctx_len = int(ctx_len)

    def _graph_inputs(self, graph: ir.Graph) -> tuple[ir.Value, ir.Value, ir.Value | None]:
        found = {name: input_by_name(graph, name) for name in (INPUT_IDS, ATTENTION_MASK, POSITION_IDS)}
        missing = [name for name in (INPUT_IDS, ATTENTION_MASK) if found[name] is None]
        if missing:
            raise PreconditionError(
                f"graph has no input {', '.join(missing)} (inputs: {', '.join(v.name or '?' for v in graph.inputs)})"
            )
        return found[INPUT_IDS], found[ATTENTION_MASK], found[POSITION_IDS]

    def _already_converted(self, graph: ir.Graph) -> bool:
        """True for a graph this pass produced with the same ``ctx_len``: idempotent, a second run changes nothing.

        A retained-state graph of another ``ctx_len`` is refused: its buffers' length is baked into the graph.
        """
        pairs = contract.kv_pairs(graph)
        if input_by_name(graph, ATTENTION_MASK) is not None or not pairs:
            return False
        lengths = sorted({p.input.shape[-2] for p in pairs if p.input.shape})
        if lengths != [self.ctx_len]:
            raise PreconditionError(
                f"graph is already in retained-state form with ctx_len {', '.join(map(str, lengths))}; converting to "
                f"ctx_len {self.ctx_len} needs the vanilla export (rerun the pipeline on it)"
            )
        assert_retained_state_contract(graph, self.ctx_len)
        return True

    def requires(self, model: ir.Model) -> None:
        graph = model.graph
        if self._already_converted(graph):
            return
        input_ids, attention_mask, _ = self._graph_inputs(graph)
        find_kv_appends(graph)
        if not find_mask_values(graph, attention_mask, input_ids):
            raise PreconditionError(
                "found no attention mask: no value computed from attention_mask (and not from input_ids) meets the "
                "attention scores"
            )

    def call(self, model: ir.Model) -> CountedResult:
        graph = model.graph
        if self._already_converted(graph):
            return self.result(model, kv_scatters=0, masks_rebuilt=0)
        input_ids, attention_mask, position_ids = self._graph_inputs(graph)
        appends = find_kv_appends(graph)
        from_mask = find_mask_values(graph, attention_mask, input_ids)
        from_shapes = find_shape_masks(graph, attention_mask, input_ids)
        terms = classify_attention_terms(model, from_mask + from_shapes, self.ctx_len, optional=frozenset(from_shapes))
        shape_biases = [t for t in terms if t.kind == "key_bias" and t.value in from_shapes]
        terms = [t for t in terms if t not in shape_biases]  # a per-key bias from shapes is already right
        masks = [t for t in terms if t.kind == "mask"]
        if not masks:
            raise PreconditionError(
                "no attention mask among the values computed from attention_mask: "
                + ", ".join(f"{t.value.name} ({t.kind})" for t in terms)
            )
        if all(t.padding_only for t in masks):
            raise PreconditionError(
                "no causal attention mask: every mask ("
                + ", ".join(t.value.name or "?" for t in masks)
                + ") lets each query see every key of an unpadded sequence, i.e. the model attends bidirectionally; "
                "retained-state decoding needs a causal decoder"
            )
        untyped = [t.value for t in masks if t.value.dtype is None]
        if untyped:  # a graph without value types (hand-written, older tools): ONNX type inference fills them in
            fill_unknown_shapes(model)
            still = [v.name or "?" for v in untyped if v.dtype is None]
            if still:
                raise PreconditionError(f"the type of attention mask value(s) {', '.join(still)} is unknown")
        if position_ids is None:
            position_ids = self._add_position_ids(graph, input_ids)
        shape_reads = self._virtualise_past_shape_reads(graph, input_ids, [a.past for a in appends])
        self._replace_masks(graph, masks, position_ids)
        real = self._real_tokens(graph, position_ids)
        for append in appends:
            self._scatter_instead_of_concat(graph, append, position_ids, real)
        RemoveUnusedNodesPass()(model)
        ones_reads = self._read_attention_mask_as_ones(graph, attention_mask, input_ids)
        graph.inputs.remove(attention_mask)
        TopologicalSortPass()(model)
        windows = sorted({t.window for t in masks if t.window is not None})
        return self.result(
            model,
            kv_scatters=len(appends),
            masks_rebuilt=len(masks),
            windowed_masks=sum(t.window is not None for t in masks),
            key_biases=sum(t.kind == "key_bias" for t in terms),
            shape_masks=sum(t.value in from_shapes for t in masks),
            attention_mask_as_ones=ones_reads,
            shape_reads=shape_reads,
            **({"window": windows[0]} if len(windows) == 1 else {}),
        )

    # -- the rewrites -------------------------------------------------------------------------------------------

    @staticmethod
    def _add_position_ids(graph: ir.Graph, input_ids: ir.Value) -> ir.Value:
        """Models whose forward takes no position_ids still get the contract's input (used by the masks and KV)."""
        shape = ir.Shape(list(input_ids.shape.dims)) if input_ids.shape is not None else None
        value = ir.Value(name=POSITION_IDS, type=ir.TensorType(ir.DataType.INT64), shape=shape)
        graph.inputs.insert(graph.inputs.index(input_ids) + 1, value)
        return value

    def _virtualise_past_shape_reads(self, graph: ir.Graph, input_ids: ir.Value, pasts: list[ir.Value]) -> int:
        """``Shape(past)`` reports ``[.., ctx_len - seq_len, ..]`` so ``past_len + seq_len`` equals ``ctx_len``."""
        reads = [n for p in pasts for n in consumers(p) if n.op_type == "Shape"]
        if not reads:
            return 0
        seq_len = ir.node("Shape", [input_ids], attributes={"start": 1, "end": 2})
        zeros = const([0, 0], np.int64)
        tail = const([0], np.int64)
        offset = ir.node("Concat", [zeros.outputs[0], seq_len.outputs[0], tail.outputs[0]], attributes={"axis": 0})
        new_nodes: list[ir.Node] = [seq_len, zeros, tail, offset]
        for read in reads:
            full = ir.node("Shape", [read.inputs[0]])
            virtual = ir.node("Sub", [full.outputs[0], offset.outputs[0]])
            new_nodes += [full, virtual]
            result = virtual.outputs[0]
            start, end = attr_int(read, "start"), attr_int(read, "end")
            if start is not None or end is not None:
                starts = const([start or 0], np.int64)
                ends = const([end if end is not None else np.iinfo(np.int64).max], np.int64)
                sliced = ir.node("Slice", [result, starts.outputs[0], ends.outputs[0]])
                new_nodes += [starts, ends, sliced]
                result = sliced.outputs[0]
            replace_all_uses(read.outputs[0], result)
        prepend(graph, new_nodes)
        return len(reads)

    def _replace_masks(self, graph: ir.Graph, masks: list[AttentionTerm], position_ids: ir.Value) -> None:
        """Each mask becomes ``p - window < key_slot <= p`` in the mask's own form (boolean or additive)."""
        built = PositionMasks(self.ctx_len, position_ids)
        for term in masks:
            mask = term.value
            if mask.dtype == ir.DataType.BOOL:
                replace_all_uses(mask, built.visible(term.window))
            else:
                replace_all_uses(mask, built.additive(term.window, mask.dtype, term.hidden))
        prepend(graph, built.nodes)

    def _read_attention_mask_as_ones(self, graph: ir.Graph, attention_mask: ir.Value, input_ids: ir.Value) -> int:
        """What still reads attention_mask (per-key biases) reads ``ones[batch, ctx_len]``: slot k holds position k."""
        readers = consumers(attention_mask)
        if not readers:
            return 0
        batch = ir.node("Shape", [input_ids], attributes={"start": 0, "end": 1})
        length = const([self.ctx_len], np.int64)
        shape = ir.node("Concat", [batch.outputs[0], length.outputs[0]], attributes={"axis": 0})
        one = ir.tensor(np.ones((1,), attention_mask.dtype.numpy()))
        ones = ir.node("ConstantOfShape", [shape.outputs[0]], attributes={"value": one})
        ones.outputs[0].name = "attention_mask_all_slots"
        prepend(graph, [batch, length, shape, ones])
        replace_all_uses(attention_mask, ones.outputs[0])
        return len(readers)

    @staticmethod
    def _real_tokens(graph: ir.Graph, position_ids: ir.Value) -> ir.Value:
        """``position_ids >= 0`` as ``[b, 1, s, 1]``: which rows of a step are tokens, not padding."""
        nodes, real = real_tokens(position_ids)
        prepend(graph, nodes)
        return real

    def _scatter_instead_of_concat(
        self, graph: ir.Graph, append: KVAppend, position_ids: ir.Value, real: ir.Value
    ) -> None:
        """Scatter the step's K or V at its positions; padding rows write zeros.

        A padding row computes garbage, and can compute inf/NaN (a zero pad embedding through an RMSNorm whose epsilon
        the exporter dropped). Its slot is masked, but a masked slot still enters ``probs @ V`` as ``0 * value``, and
        ``0 * NaN`` is NaN: zeros keep every masked slot harmless.
        """
        past, concat = append.past, append.concat
        past.name = contract.retained_input_name(append.layer, append.kind)
        if past.shape is not None:
            dims = list(past.shape.dims)
            dims[-2] = self.ctx_len
            past.shape = ir.Shape(dims)
        nodes, out = build_kv_scatter(past, append.new, position_ids, real)
        old_out = concat.outputs[0]
        graph.insert_after(concat, nodes)
        replace_all_uses(old_out, out)
        if old_out.is_graph_output():
            graph.outputs[graph.outputs.index(old_out)] = out
        old_out.name = None
        out.name = contract.retained_output_name(past.name)
        graph.remove(concat, safe=True)

    def ensures(self, model: ir.Model) -> None:
        assert_retained_state_contract(model.graph, self.ctx_len)


def assert_retained_state_contract(graph: ir.Graph, ctx_len: int) -> None:
    """The retained-state I/O contract (``qgraph.contract``); ``PostconditionError`` saying what does not hold."""
    problems = contract.retained_state_problems(graph, ctx_len)
    if problems:
        raise PostconditionError("retained-state contract broken: " + "; ".join(problems))

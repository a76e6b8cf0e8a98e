"""fp16 clipping: float32 constants fit float16, and "minus infinity" masks stay masks without producing NaN.

Why: a graph that runs in float16 (ours after ``fp16-convert``, or a target compiler that converts a float32 graph to
float16 itself) turns every float32 constant beyond +-65504 into +-inf. Decoders are full of such constants: the
additive attention mask uses float32's minimum (-3.4e38) or -1e9 / -inf for "hidden".

Two steps:

1. **Masks become selects** (a rewrite rule): ``scores + Where(visible, 0, NEG)`` -> ``Where(visible, scores, NEG)``
   when ``NEG`` means minus infinity (a constant <= -65504, or -inf). In float16 the additive form overflows:
   ``scores + (-65504)`` is -inf as soon as a score is below -16, and a query row that sees no key at all (a padding
   row) becomes all -inf, so Softmax computes ``-inf - (-inf) = NaN``. The select form never adds to the minimum, so
   a fully hidden row is uniform (as it is in float32) and a partially hidden one gives its hidden keys exactly 0.
   ``Where(visible, bias, NEG)`` masks keep their bias: ``Where(visible, scores + bias, NEG)``.
2. **Clipping** (imperative, every float32 tensor constant: initializers, ``Constant`` values, ``ConstantOfShape``
   fill values, in the graph and in function bodies): values above 65504 become 65504, values below -65504 (-inf
   included) become -65504, the most negative finite float16, which is still "hidden" for a select-form mask. NaN,
   in-range values and non-float32 tensors (integers, float16) are left alone.

Counts: ``masks_selected``, ``tensors_clipped``, ``values_clipped``. Idempotent.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import common
from onnxscript.rewriter import pattern as rw

from qgraph.onnxscript_compat import get_numpy_value
from qgraph.pass_manager import CountedResult, GraphPass
from qgraph.verify import rule_misses

log = logging.getLogger(__name__)

FP16_MAX = float(np.finfo(np.float16).max)  # 65504


def _means_minus_infinity(value: ir.Value | None) -> bool:
    array = get_numpy_value(value) if value is not None else None
    return array is not None and array.size > 0 and bool(np.all(np.asarray(array, np.float64) <= -FP16_MAX))


class AdditiveMaskToSelect(rw.RewriteRuleClassBase):
    """``scores + Where(c, a, NEG)`` (either operand order, ``NEG`` in either branch) -> a ``Where`` select.

    The mask ``Where`` is not part of the matched subgraph (every layer shares one mask): the rule reads its inputs.
    """

    def __init__(self, mask_first: bool):
        super().__init__(f"additive mask -> select{' (mask first)' if mask_first else ''}")
        self.mask_first = mask_first

    def pattern(self, op, scores, mask):
        return op.Add(mask, scores) if self.mask_first else op.Add(scores, mask)

    def check(self, context, scores, mask, **_):
        result = rw.MatchResult()
        where = mask.producer()
        if where is None or where.op_type != "Where" or where.domain not in ("", "ai.onnx"):
            return result.fail("the added value is not produced by Where", mask)
        _, on_true, on_false = where.inputs
        if _means_minus_infinity(on_false):
            self._hidden_on_true = False
        elif _means_minus_infinity(on_true):
            self._hidden_on_true = True
        else:
            return result.fail("neither Where branch is a constant meaning minus infinity (<= -65504)", where)
        if scores.dtype is not None and mask.dtype is not None and scores.dtype != mask.dtype:
            return result.fail("scores and mask differ in type", mask)
        return result

    def rewrite(self, op, scores, mask, **_):
        condition, on_true, on_false = mask.producer().inputs
        hidden, shown = (on_true, on_false) if self._hidden_on_true else (on_false, on_true)
        shown_value = get_numpy_value(shown)
        if shown_value is None or np.any(shown_value != 0):
            scores = op.Add(scores, shown)
            scores.dtype = mask.dtype
        hidden_array = np.maximum(np.asarray(get_numpy_value(hidden)), -FP16_MAX).astype(hidden.dtype.numpy())
        hidden = op.Constant(value=ir.tensor(hidden_array))
        if self._hidden_on_true:
            return op.Where(condition, hidden, scores)
        return op.Where(condition, scores, hidden)


MASK_RULES = rw.RewriteRuleSet([AdditiveMaskToSelect.rule(mask_first=False), AdditiveMaskToSelect.rule(True)])


def _clipped(tensor: ir.TensorProtocol) -> tuple[ir.Tensor | None, int]:
    """A float16-safe copy of a float32 tensor and how many values it changed (None, 0 when already safe)."""
    if tensor.dtype != ir.DataType.FLOAT:
        return None, 0
    array = tensor.numpy()
    outside = np.abs(array) > FP16_MAX  # NaN compares False: left alone
    count = int(np.count_nonzero(outside))
    if not count:
        return None, 0
    return ir.tensor(np.clip(array, -FP16_MAX, FP16_MAX).astype(np.float32), name=tensor.name), count


class FP16Clip(GraphPass):
    """Additive "minus infinity" masks -> selects; float32 constants clipped to the float16 range."""

    name = "fp16-clip"
    summary = "additive -inf masks -> Where selects; float32 constants clipped to +-65504 (integers untouched)"

    def __init__(self, masks: bool = True):
        self.masks = masks
        self.near_misses: list[str] = []

    def call(self, model: ir.Model) -> CountedResult:
        selected = MASK_RULES.apply_to_model(model) if self.masks else 0
        if selected:  # the additive masks are dead now: do not count them as clipped
            common.RemoveUnusedNodesPass()(model)
        tensors = values = 0
        for graph in (*model.graphs(), *(f.graph for f in model.functions.values())):
            for value in graph.initializers.values():
                if value.const_value is None:
                    continue
                new, count = _clipped(value.const_value)
                if new is not None:
                    value.const_value = new
                    tensors, values = tensors + 1, values + count
            for node in graph:
                t, v = self._clip_attributes(node)
                tensors, values = tensors + t, values + v
        if self.masks:
            self.near_misses = [m for m in rule_misses(model, [MASK_RULES]) if "not produced by Where" not in m]
            for miss in self.near_misses:
                log.info("fp16-clip: mask not rewritten: %s", miss)
        return self.result(model, masks_selected=selected, tensors_clipped=tensors, values_clipped=values)

    @staticmethod
    def _clip_attributes(node: ir.Node) -> tuple[int, int]:
        """Clip the tensors a ``Constant`` or ``ConstantOfShape`` holds in its attributes."""
        if node.domain not in ("", "ai.onnx") or node.op_type not in ("Constant", "ConstantOfShape"):
            return 0, 0
        tensors = values = 0
        for name, attr in list(node.attributes.items()):
            if attr.is_ref():
                continue
            if attr.type == ir.AttributeType.TENSOR:
                new, count = _clipped(attr.as_tensor())
                if new is not None:
                    node.attributes[name] = ir.AttrTensor(name, new)
            elif attr.type == ir.AttributeType.FLOAT:
                x = attr.as_float()
                count = int(abs(x) > FP16_MAX)
                if count:
                    node.attributes[name] = ir.AttrFloat32(name, float(np.clip(x, -FP16_MAX, FP16_MAX)))
            elif attr.type == ir.AttributeType.FLOATS:
                floats = np.asarray(attr.as_floats(), np.float32)
                count = int(np.count_nonzero(np.abs(floats) > FP16_MAX))
                if count:
                    node.attributes[name] = ir.AttrFloat32s(name, np.clip(floats, -FP16_MAX, FP16_MAX).tolist())
            else:
                continue
            tensors, values = tensors + (count > 0), values + count
        if tensors and node.op_type == "Constant":  # the value the rewriter reads must be the clipped one
            attr = node.attributes.get("value")
            tensor = attr.as_tensor() if attr is not None and attr.type == ir.AttributeType.TENSOR else None
            node.outputs[0].const_value = tensor
        return tensors, values

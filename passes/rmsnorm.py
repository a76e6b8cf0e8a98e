"""RMSNorm: every decomposed RMSNorm becomes one canonical op, lowered to what the backend executes.

Why: an exported RMSNorm is seven nodes (``Pow, ReduceMean, Add, Sqrt, Reciprocal, Mul, Mul``) per norm, two norms
per layer plus the final one. Targets have one fused kernel for it (ONNX Runtime: ``SimplifiedLayerNormalization``;
ONNX opset 23: ``RMSNormalization``; others: a custom op of their own, given as a model-local function), and fp16
targets need the
``x**2`` sum computed in float32, which a fused op does internally.

Two steps, both rewrite rules (``onnxscript.rewriter``):

1. **Fusion** to the canonical op ``qgraph.RMSNorm(x, scale; axis=-1, epsilon, stash_type)`` whose meaning is ONNX
   ``RMSNormalization``: normalise in ``stash_type`` over the last axis, output in the scale's type. The rules accept
   the variants exporters and models produce: ``Cast`` to float32 around the normalisation or not; ``Pow(x, 2)`` or
   ``Mul(x, x)``; ``Reciprocal(Sqrt)``, ``Div(1, Sqrt)``, ``Pow(., -0.5)`` or ``Div(x, Sqrt)``; the weight on either
   side; Gemma's ``x_normed * (1 + weight)``; no weight at all. Every refused candidate says why (``near_misses``).
   Already-fused forms (``SimplifiedLayerNormalization``, ``RMSNormalization``, a call to a function an earlier
   ``FunctionLowering`` wrote) other than the target's are lifted to the canonical op too, so one graph can be
   re-lowered for another backend.
2. **Lowering** of the canonical op (``lowering``; the standard pipeline picks the first the target executes):
   ``ort-fused`` -> ``SimplifiedLayerNormalization`` (ONNX Runtime registers it in the default domain);
   ``onnx-23`` -> ``RMSNormalization`` (the model is converted to opset 23 first);
   a ``FunctionLowering`` (offered by a backend for its own custom op) -> a call to that model-local function, whose
   body is standard ops (so any runtime, ONNX Runtime included, can execute it by inlining); ``decomposed`` ->
   standard ops inline (no fusion is done, fused forms are expanded); ``canonical`` -> left as ``qgraph.RMSNorm``
   (for inspection; nothing runs it).

Contract: graph inputs/outputs unchanged; counts ``fused`` (decomposed chains replaced), ``converted`` (fused forms
of another kind re-lowered) and ``decomposed``. Idempotent: a second run finds nothing to do.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import common
from onnxscript.rewriter import pattern as rw

from qgraph.graph_utils import MS_DOMAIN, onnx_opset
from qgraph.graph_utils import scalar as _scalar
from qgraph.onnxscript_compat import get_const_value, get_numpy_value
from qgraph.pass_manager import CountedResult, GraphPass
from qgraph.verify import rule_misses

log = logging.getLogger(__name__)

CANONICAL_DOMAIN = "qgraph"
CANONICAL_OP = "RMSNorm"
LOWERINGS = ("ort-fused", "onnx-23", "decomposed", "canonical")  # and any FunctionLowering
# Marks a model-local function a FunctionLowering wrote, so a later run can lift its calls back to the canonical op.
FUNCTION_MARK = "qgraph.rmsnorm_lowering"

FLOAT_TYPES = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE})
STASH_TYPES = frozenset({ir.DataType.FLOAT, ir.DataType.DOUBLE})


@dataclass(frozen=True)
class FunctionLowering:
    """RMSNorm as a call ``domain.op_type(x, weight; epsilon)`` to a model-local function that computes in its input
    type; ``body(onnx_opset)`` builds the function (standard ops, so any runtime can inline it). A target whose
    compiler maps that op to a kernel of its own offers one of these to the pass (``lowering=``)."""

    domain: str
    op_type: str
    body: Callable[[int], ir.Function]

    def __repr__(self) -> str:  # part of a pipeline's cache key: stable, no addresses
        return f"FunctionLowering({self.domain}::{self.op_type})"

    __str__ = __repr__

    @property
    def op(self) -> tuple[str, str]:
        return self.domain, self.op_type

    def function(self, onnx_opset: int) -> ir.Function:
        function = self.body(onnx_opset)
        if (function.domain, function.name) != self.op:
            raise ValueError(f"{self}: its body builds the function {function.domain}::{function.name}")
        function.metadata_props[FUNCTION_MARK] = "1"
        return function


# What each named lowering writes (a FunctionLowering writes its own op).
LOWERED_OPS = {
    "ort-fused": ("", "SimplifiedLayerNormalization"),
    "onnx-23": ("", "RMSNormalization"),
    "canonical": (CANONICAL_DOMAIN, CANONICAL_OP),
}


def _is_close(value: ir.Value | None, expected: float) -> bool:
    got = _scalar(value)
    return got is not None and abs(got - expected) <= 1e-6 * max(1.0, abs(expected))


def _reduce_axes(node: ir.Node) -> list[int] | None:
    """The axes of a ReduceMean, from its second input (opset >= 18) or its ``axes`` attribute (older opsets)."""
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        array = get_numpy_value(node.inputs[1])
        return None if array is None else [int(a) for a in np.asarray(array).reshape(-1)]
    attr = node.attributes.get("axes")
    return None if attr is None else [int(a) for a in attr.as_ints()]


def _dtype(value: ir.Value | None) -> ir.DataType | None:
    """A value's element type: declared, read off its constant, or implied by a Cast / Identity producing it
    (TorchScript exports leave intermediate values untyped)."""
    for _ in range(8):
        if value is None:
            return None
        if value.dtype is not None:
            return value.dtype
        tensor = get_const_value(value)
        if tensor is not None:
            return tensor.dtype
        producer = value.producer()
        if producer is not None and producer.op_type == "Cast" and "to" in producer.attributes:
            return ir.DataType(producer.attributes["to"].as_int())
        if producer is None or producer.op_type != "Identity":
            return None
        value = producer.inputs[0]
    return None


def _last_dim(value: ir.Value) -> int | str | None:
    if value.shape is None or value.shape.rank() == 0:
        return None
    dim = value.shape[-1]
    return dim if isinstance(dim, int) else (dim.value if dim is not None else None)


def _is_mean_centred(value: ir.Value) -> bool:
    """``value = a - ReduceMean(a)``: the normalisation that follows is a LayerNorm's."""
    sub = value.producer()
    if sub is None or sub.op_type != "Sub" or len(sub.inputs) != 2:
        return False
    mean = sub.inputs[1].producer() if sub.inputs[1] is not None else None
    return mean is not None and mean.op_type == "ReduceMean" and mean.inputs[0] is sub.inputs[0]


# -- fusion: decomposed chains -> canonical op --------------------------------------------------------------------


class DecomposedRMSNorm(rw.RewriteRuleClassBase):
    """``[Cast] -> x^2 -> ReduceMean(-1) -> + eps -> 1/sqrt -> * x -> [Cast] -> * weight``  ->  ``qgraph.RMSNorm``.

    One rule per weight placement (``weight_first``), per weight form (``one_plus_weight``: Gemma's ``1 + w``), with
    and without the input ``Cast`` (``cast_in``; the rule with the Cast goes first, the one without takes over when the
    cast value is used elsewhere too) and for the weightless norm (``weighted=False``, applied after the weighted rules
    so it never splits a weighted norm). The other variants are ``OrValue`` alternatives inside the pattern.
    """

    def __init__(
        self,
        weighted: bool = True,
        weight_first: bool = False,
        one_plus_weight: bool = False,
        root: int = 0,
        cast_in: bool = False,
    ):
        if weighted:
            form = ("1 + weight" if one_plus_weight else "weight") + (", weight first" if weight_first else "")
        else:
            form = f"weightless, {('x * inv', 'inv * x', 'x / sqrt')[root]}"
        super().__init__(f"RMSNorm[{form}{', cast input' if cast_in else ''}]")
        self.weighted, self.weight_first, self.one_plus_weight = weighted, weight_first, one_plus_weight
        self.root = root  # weightless rules: which form of the normalisation ends the pattern
        self.cast_in = cast_in

    def pattern(self, op, x, two, epsilon, numerator, minus_half, weight, one):
        xc = op.Cast(x, to=rw.AttrVar("compute_dtype")) if self.cast_in else x
        square = rw.OrValue([op.Pow(xc, two), op.Mul(xc, xc)])
        mean = op.ReduceMean(square, _allow_other_inputs=True, _outputs=["mean"])
        var = rw.OrValue([op.Add(mean, epsilon), op.Add(epsilon, mean)])
        std = op.Sqrt(var)
        inv = rw.OrValue([op.Reciprocal(std), op.Div(numerator, std), op.Pow(var, minus_half)])
        if not self.weighted:  # a pattern may not end in a choice: one rule per form
            return (op.Mul(xc, inv), op.Mul(inv, xc), op.Div(xc, std))[self.root]
        normalized = rw.OrValue([op.Mul(xc, inv), op.Mul(inv, xc), op.Div(xc, std)])
        out = rw.OrValue([op.Cast(normalized, to=rw.AttrVar("target_dtype")), normalized])
        scale = rw.OrValue([op.Add(weight, one), op.Add(one, weight)]) if self.one_plus_weight else weight
        return op.Mul(scale, out) if self.weight_first else op.Mul(out, scale)

    def check(self, context, x, two, epsilon, numerator, minus_half, mean, weight=None, one=None, **vars):
        result = rw.MatchResult()
        if _is_mean_centred(x):
            return result.fail("the input is x - mean(x): this is a LayerNorm, not an RMSNorm", x)
        if two is not None and not _is_close(two, 2.0):
            return result.fail(f"the square is Pow(x, {_scalar(two)}), not Pow(x, 2)", two)
        if numerator is not None and not _is_close(numerator, 1.0):
            return result.fail(f"the inverse is Div({_scalar(numerator)}, sqrt), not Div(1, sqrt)", numerator)
        if minus_half is not None and not _is_close(minus_half, -0.5):
            return result.fail(f"the inverse is Pow(var, {_scalar(minus_half)}), not Pow(var, -0.5)", minus_half)
        reduce = mean.producer()
        axes = _reduce_axes(reduce)
        rank = x.shape.rank() if x.shape is not None else None
        if axes is None:
            return result.fail("ReduceMean axes are not constant", reduce)
        if axes != [-1] and not (rank is not None and axes == [rank - 1]):
            return result.fail(f"ReduceMean is over axes {axes}, not the last axis only", reduce)
        keepdims = reduce.attributes.get("keepdims")
        if keepdims is not None and keepdims.as_int() != 1:
            return result.fail("ReduceMean has keepdims=0", reduce)
        eps = _scalar(epsilon)
        if eps is None or eps < 0:
            return result.fail("epsilon is not a non-negative scalar constant", epsilon)
        compute = vars.get("compute_dtype")
        cast_in = self.cast_in and compute is not None
        w_type = _dtype(weight) if self.weighted else None
        x_type = _dtype(x) or (ir.DataType(compute.as_int()) if cast_in else None) or w_type
        if x_type is None:
            return result.fail("the input's type is unknown (cleanup's shape inference fills it in)", x)
        if x_type not in FLOAT_TYPES:
            return result.fail(f"input type {x_type} is not a float type", x)
        stash = ir.DataType(compute.as_int()) if cast_in else x_type
        self._stash = stash if stash in STASH_TYPES else ir.DataType.FLOAT  # fp16 inputs: normalise in float32
        self._epsilon = eps
        if not self.weighted:
            return result
        if self.one_plus_weight and not _is_close(one, 1.0):
            return result.fail(f"the scale is weight + {_scalar(one)}, not 1 + weight", one)
        if w_type not in FLOAT_TYPES:
            return result.fail(f"weight type {w_type} is not a float type", weight)
        if weight.shape is None or any(d != 1 for d in list(weight.shape)[:-1]) or weight.shape.rank() == 0:
            return result.fail(f"weight shape {weight.shape} is not [hidden]: this Mul is not a norm weight", weight)
        if _last_dim(x) is not None and _last_dim(weight) != _last_dim(x):
            return result.fail(f"weight shape {weight.shape} does not match the normalised axis of {x.shape}", weight)
        target = vars.get("target_dtype")
        if target is not None and ir.DataType(target.as_int()) != w_type:
            return result.fail("the normalised value is cast to a type other than the weight's", weight)
        return result

    def rewrite(self, op, x, weight=None, one=None, **_):
        if not self.weighted:
            hidden = _last_dim(x)
            dtype = x.dtype if x.dtype in FLOAT_TYPES else ir.DataType.FLOAT
            if not isinstance(hidden, int):  # ones shaped like the last axis, computed at run time
                shape = op.Shape(x, start=-1)
                scale = op.ConstantOfShape(shape, value=ir.tensor(np.ones([1], dtype.numpy())))
            else:
                scale = op.Constant(value=ir.tensor(np.ones([hidden], dtype.numpy())))
        elif self.one_plus_weight:
            w = get_numpy_value(weight)
            if w is not None:
                scale = op.Constant(value=ir.tensor((w + np.asarray(1, w.dtype)).astype(w.dtype)))
            else:
                scale = op.Add(weight, one)
            scale.dtype, scale.shape = _dtype(weight), weight.shape
        else:
            scale = weight
        return op.RMSNorm(
            x,
            scale,
            axis=-1,
            epsilon=self._epsilon,
            stash_type=int(self._stash),
            _domain=CANONICAL_DOMAIN,
            _version=1,
        )


WEIGHTED_RULES = rw.RewriteRuleSet(
    [
        DecomposedRMSNorm.rule(weighted=True, weight_first=first, one_plus_weight=plus_one, cast_in=cast)
        for plus_one in (True, False)  # 1 + w first: a plain rule would take the Add as the weight
        for cast in (True, False)
        for first in (True, False)
    ]
)
WEIGHTLESS_RULES = rw.RewriteRuleSet(
    [DecomposedRMSNorm.rule(weighted=False, root=r, cast_in=cast) for cast in (True, False) for r in range(3)]
)


# -- fused forms of other kinds -> canonical op ----------------------------------------------------------------------


def _single_output(node: ir.Node) -> bool:
    return all(not out.uses() and not out.is_graph_output() for out in node.outputs[1:])


def _axis_is_last(node: ir.Node, x: ir.Value) -> bool:
    attr = node.attributes.get("axis")
    axis = -1 if attr is None else attr.as_int()
    rank = x.shape.rank() if x.shape is not None else None
    return axis == -1 or (rank is not None and axis == rank - 1)


class LiftFused(rw.RewriteRuleClassBase):
    """A fused RMSNorm of another form (``op_type`` in ``domain``) -> the canonical op."""

    def __init__(self, op_type: str, domain: str):
        super().__init__(f"lift {domain + '.' if domain else ''}{op_type}")
        self.op_type, self.domain = op_type, domain

    def pattern(self, op, x, scale):
        return getattr(op, self.op_type)(x, scale, _domain=self.domain, _outputs=["y"], _allow_other_inputs=False)

    def check(self, context, x, scale, y, **_):
        result = rw.MatchResult()
        node = y.producer()
        if not _single_output(node):
            return result.fail(f"{self.op_type}'s extra outputs (mean / inverse std) are used", node)
        if not _axis_is_last(node, x):
            return result.fail(f"{self.op_type} normalises from axis {node.attributes['axis'].as_int()}", node)
        eps = node.attributes.get("epsilon")
        self._epsilon = eps.as_float() if eps is not None else 1e-5
        stash = node.attributes.get("stash_type")
        self._stash = stash.as_int() if stash is not None else int(ir.DataType.FLOAT)
        return result

    def rewrite(self, op, x, scale, **_):
        return op.RMSNorm(
            x, scale, axis=-1, epsilon=self._epsilon, stash_type=self._stash, _domain=CANONICAL_DOMAIN, _version=1
        )


class LiftFunction(LiftFused):
    """A call to a function a ``FunctionLowering`` wrote: it computes in its input type, so stash = the input's."""

    def check(self, context, x, scale, y, **_):
        result = super().check(context, x, scale, y)
        if result:
            self._stash = int(x.dtype) if x.dtype in STASH_TYPES else int(ir.DataType.FLOAT)
        return result


def _lowered_op(lowering: str | FunctionLowering) -> tuple[str, str] | None:
    return lowering.op if isinstance(lowering, FunctionLowering) else LOWERED_OPS.get(lowering)


def _lowering_functions(model: ir.Model) -> list[ir.Function]:
    return [f for f in model.functions.values() if f.metadata_props.get(FUNCTION_MARK)]


def lift_rules(lowering: str | FunctionLowering, model: ir.Model) -> rw.RewriteRuleSet | None:
    """Rules lifting every fused form but the target's own to the canonical op (function calls: those in ``model``)."""
    keep = _lowered_op(lowering)
    rules = []
    for domain, op_type in LOWERED_OPS.values():
        if (domain, op_type) != keep and domain != CANONICAL_DOMAIN:
            rules.append(LiftFused.rule(op_type, domain))
    for function in _lowering_functions(model):
        if (function.domain, function.name) != keep:
            rules.append(LiftFunction.rule(function.name, function.domain))
    if lowering != "ort-fused":  # ORT also accepts its op in the com.microsoft domain
        rules.append(LiftFused.rule("SimplifiedLayerNormalization", MS_DOMAIN))
    return rw.RewriteRuleSet(rules) if rules else None


# -- lowering: canonical op -> target form -----------------------------------------------------------------------


class LowerCanonical(rw.RewriteRuleClassBase):
    """``qgraph.RMSNorm`` -> the target's form (see the module docstring)."""

    def __init__(self, lowering: str | FunctionLowering, onnx_opset: int):
        super().__init__(f"lower RMSNorm -> {lowering}")
        self.lowering, self.onnx_opset = lowering, onnx_opset

    def pattern(self, op, x, scale):
        return op.RMSNorm(x, scale, _domain=CANONICAL_DOMAIN, _outputs=["y"])

    def rewrite(self, op, x, scale, y, **_):
        node = y.producer()
        eps = node.attributes["epsilon"].as_float()
        stash = ir.DataType(node.attributes["stash_type"].as_int())
        if self.lowering == "ort-fused":
            return op.SimplifiedLayerNormalization(x, scale, axis=-1, epsilon=eps, stash_type=int(stash))
        if self.lowering == "onnx-23":
            return op.RMSNormalization(x, scale, axis=-1, epsilon=eps, stash_type=int(stash))
        # function / decomposed: standard ops compute in their input type, so cast to the stash type around them
        out_type = _dtype(scale)
        xs = x if _dtype(x) in (stash, None) else _typed(op.Cast(x, to=int(stash)), stash, x.shape)
        ws = scale if out_type in (stash, None) else _typed(op.Cast(scale, to=int(stash)), stash, scale.shape)
        if isinstance(self.lowering, FunctionLowering):
            result = op.op(self.lowering.op_type, xs, ws, epsilon=eps, _domain=self.lowering.domain, _version=1)
        else:
            result = _decomposed(op, xs, ws, eps, stash, self.onnx_opset)
        result.dtype, result.shape = stash, x.shape
        if out_type is not None and out_type != stash:
            result = op.Cast(result, to=int(out_type))
        return result


def _typed(value: ir.Value, dtype: ir.DataType, shape: ir.Shape | None) -> ir.Value:
    value.dtype, value.shape = dtype, shape
    return value


def _decomposed(op, x, weight, eps: float, dtype: ir.DataType, onnx_opset: int) -> ir.Value:
    """``weight * (x * Reciprocal(Sqrt(ReduceMean(Pow(x, 2), [-1]) + eps)))`` in ``dtype``, standard ops only."""
    square = op.Pow(x, op.Constant(value=ir.tensor(np.array(2.0, dtype.numpy()))))
    if onnx_opset >= 18:
        mean = op.ReduceMean(square, op.Constant(value=ir.tensor(np.array([-1], np.int64))), keepdims=1)
    else:
        mean = op.ReduceMean(square, axes=[-1], keepdims=1)
    var = op.Add(mean, op.Constant(value=ir.tensor(np.array(eps, dtype.numpy()))))
    return op.Mul(weight, op.Mul(x, op.Reciprocal(op.Sqrt(var))))


def _count_ops(model: ir.Model, domain: str, op_type: str) -> int:
    nodes = ir.traversal.RecursiveGraphIterator(model.graph)
    return sum(1 for n in nodes if (n.domain, n.op_type) == (domain, op_type))


class RMSNormFusion(GraphPass):
    """Decomposed RMSNorm chains -> one canonical op -> the backend's RMSNorm (``lowering``)."""

    name = "rmsnorm-fuse"
    summary = "decomposed RMSNorm -> one op: SimplifiedLayerNormalization / RMSNormalization / a backend's function op"

    def __init__(self, lowering: str | FunctionLowering = "ort-fused"):
        if not isinstance(lowering, FunctionLowering) and lowering not in LOWERINGS:
            raise ValueError(
                f"lowering must be one of {', '.join(LOWERINGS)} or a FunctionLowering a backend offers; "
                f"got {lowering!r}"
            )
        self.lowering = lowering
        self.near_misses: list[str] = []

    @classmethod
    def emitted(cls, options) -> frozenset[tuple[str, str]]:
        """The op its ``lowering`` writes (nothing beyond standard ONNX for ``decomposed``)."""
        op = _lowered_op(options.get("lowering", "ort-fused"))
        return frozenset({op}) if op is not None and op[0] != CANONICAL_DOMAIN else frozenset()

    def call(self, model: ir.Model) -> CountedResult:
        fused = 0
        if self.lowering != "decomposed":
            fused = WEIGHTED_RULES.apply_to_model(model) + WEIGHTLESS_RULES.apply_to_model(model)
        lifts = lift_rules(self.lowering, model)
        converted = lifts.apply_to_model(model) if lifts is not None else 0
        lowered = 0
        if self.lowering != "canonical" and _count_ops(model, CANONICAL_DOMAIN, CANONICAL_OP):
            if self.lowering == "onnx-23" and onnx_opset(model) < 23:
                from onnxscript import version_converter

                version_converter.convert_version(model, 23)
            lower = rw.RewriteRuleSet([LowerCanonical.rule(self.lowering, onnx_opset(model))])
            lowered = lower.apply_to_model(model)
            if isinstance(self.lowering, FunctionLowering):
                function = self.lowering.function(onnx_opset(model))
                if function.identifier() not in model.functions:
                    model.functions[function.identifier()] = function
                model.opset_imports.setdefault(self.lowering.domain, 1)
        if fused or converted or lowered:  # constants the chains read (eps, 2, axes) are dead now
            common.RemoveUnusedNodesPass()(model)
        _drop_unused_imports(model)
        self.near_misses = rule_misses(model, [WEIGHTED_RULES, WEIGHTLESS_RULES])
        for miss in self.near_misses:
            log.info("rmsnorm-fuse: not fused: %s", miss)
        counts = {"fused": fused, "converted": converted}
        if self.lowering == "decomposed":
            counts["decomposed"] = lowered
        result = self.result(model, **counts)
        result.modified = bool(fused or converted or lowered)
        result.misses = list(self.near_misses)
        return result


def _drop_unused_imports(model: ir.Model) -> None:
    """No canonical op left: drop its domain; a lowering's function no call is left to: drop it and its domain."""
    dropped = []
    for function in _lowering_functions(model):
        if not _count_ops(model, function.domain, function.name):
            model.functions.pop(function.identifier(), None)
            dropped.append(function.domain)
    used = {n.domain for n in ir.traversal.RecursiveGraphIterator(model.graph)}
    for function in model.functions.values():
        used.update(n.domain for n in function)
    for domain in [CANONICAL_DOMAIN, *dropped]:
        if domain not in used:
            model.opset_imports.pop(domain, None)

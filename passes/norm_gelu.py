"""LayerNorm and Gelu normalisation: one ``LayerNormalization`` and one Gelu op per block, whatever the exporter wrote.

Why: GPT-2-style graphs reach us in several spellings. The dynamo exporter writes ``LayerNormalization`` but spells
GPT-2's tanh Gelu as ten nodes; older exporters (opset < 17 style) decompose LayerNorm into ``ReduceMean, Sub, Pow,
ReduceMean, Add, Sqrt, Div, Mul, Add``; other tools emit ORT's ``FastGelu`` / ``Gelu``. Backend lowerings and fusions
then need to know one form only.

Rules (``onnxscript.rewriter``):

- LayerNorm: onnxscript's own LayerNorm fusion rules (``rules.fusion._layer_norm``: decomposed LayerNorm, then the
  trailing bias ``Add`` folded in), applied with commuted variants. Opset >= 17 only (``LayerNormalization``).
- Gelu, tanh form ``0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))`` and erf form
  ``0.5 * x * (1 + erf(x / sqrt(2)))``, with the product of ``x``, ``0.5`` and ``(1 + ...)`` grouped any way (or
  ``/ 2``), commuted operands, ``x^3`` as ``Pow`` or ``Mul``, ``x / sqrt(2)`` as ``Div`` or ``Mul(1/sqrt(2))``.
  Constants are checked with a tolerance and a refusal names the constant that is off.
- Target form (``gelu`` option): ``"onnx"`` -> ``Gelu(approximate="tanh" | "none")`` (opset >= 20);
  ``"com.microsoft"`` -> ORT's ``FastGelu`` (tanh) / ``Gelu`` (erf); ``"auto"``: ``onnx`` from opset 20, else
  ``com.microsoft``. Fused Gelus of the other family are converted to the target form.

Counts: ``layernorm_fused``, ``bias_folded``, ``gelu_fused``, ``gelu_converted``. Idempotent.
"""

from __future__ import annotations

import logging
import math

import onnx_ir as ir
from onnx_ir.passes import common
from onnxscript.rewriter import pattern as rw
from onnxscript.rewriter.rules.fusion import _layer_norm

from qgraph.graph_utils import MS_DOMAIN, onnx_opset
from qgraph.onnxscript_compat import get_const_value, get_singleton_value
from qgraph.pass_manager import CountedResult, GraphPass
from qgraph.verify import rule_misses

log = logging.getLogger(__name__)

GELU_TARGETS = ("onnx", "com.microsoft", "auto")
_CONSTANTS = {  # pattern variable -> (expected value, what it is)
    "half": (0.5, "the 0.5 factor"),
    "one": (1.0, "the 1 in (1 + tanh/erf)"),
    "cubic": (0.044715, "the cubic coefficient 0.044715"),
    "sqrt_2_over_pi": (math.sqrt(2.0 / math.pi), "sqrt(2/pi)"),
    "three": (3.0, "the exponent 3"),
    "sqrt_2": (math.sqrt(2.0), "the divisor sqrt(2)"),
    "inv_sqrt_2": (1.0 / math.sqrt(2.0), "the factor 1/sqrt(2)"),
    "two": (2.0, "the divisor 2"),
}


def _mul(op, a, b):
    """``a * b`` in either operand order."""
    return rw.OrValue([op.Mul(a, b), op.Mul(b, a)])


def _add(op, a, b):
    return rw.OrValue([op.Add(a, b), op.Add(b, a)])


class GeluFusion(rw.RewriteRuleClassBase):
    """A decomposed Gelu (``form``: ``"tanh"`` or ``"erf"``) -> the target Gelu op.

    ``root`` says how the outer product ``x * 0.5 * s`` (``s = 1 + tanh/erf(...)``) is grouped, since a pattern may
    not end in a choice: ``("x", first)`` is ``x * (0.5 * s)`` with ``x`` first or second; likewise ``"half"``,
    ``"s"``; ``("div2", _)`` is ``(x * s) / 2``.
    """

    def __init__(self, form: str, alone: str, alone_first: bool, target: str):
        super().__init__(f"Gelu[{form}, {alone}{' first' if alone_first else ''}]")
        self.form, self.alone, self.alone_first, self.target = form, alone, alone_first, target

    def pattern(self, op, x, half, one, cubic, sqrt_2_over_pi, three, sqrt_2, inv_sqrt_2, two):
        if self.form == "tanh":
            cube = rw.OrValue([op.Pow(x, three), _mul(op, x, op.Mul(x, x))])
            inner = _add(op, x, _mul(op, cubic, cube))
            s = _add(op, op.Tanh(_mul(op, sqrt_2_over_pi, inner)), one)
        else:
            scaled = rw.OrValue([op.Div(x, sqrt_2), _mul(op, x, inv_sqrt_2)])
            s = _add(op, op.Erf(scaled), one)
        if self.alone == "div2":
            return op.Div(_mul(op, x, s), two)
        factors = {"x": x, "half": half, "s": s}
        alone = factors.pop(self.alone)
        pair = _mul(op, *factors.values())
        return op.Mul(alone, pair) if self.alone_first else op.Mul(pair, alone)

    def check(self, context, x, **bound):
        result = rw.MatchResult()
        for name, (expected, what) in _CONSTANTS.items():
            value = bound.get(name)
            if value is None:
                continue
            got = get_singleton_value(value)
            if not isinstance(got, int | float) or not math.isclose(got, expected, rel_tol=1e-3):
                return result.fail(f"{what} is {got}, expected {expected:.6g}", value)
        if x.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE, ir.DataType.BFLOAT16):
            return result.fail(f"input type {x.dtype} is not a float type", x)
        return result

    def rewrite(self, op, x, **_):
        return _gelu(op, x, self.form, self.target)


def _gelu(op, x, form: str, target: str):
    if target == "onnx":
        return op.Gelu(x, approximate="tanh" if form == "tanh" else "none")
    if form == "tanh":
        return op.FastGelu(x, _domain=MS_DOMAIN, _version=1)
    return op.Gelu(x, _domain=MS_DOMAIN, _version=1)


class ConvertFusedGelu(rw.RewriteRuleClassBase):
    """A fused Gelu of the other family -> the target's (``FastGelu`` <-> ``Gelu(tanh)``, ``Gelu`` <-> ``Gelu``)."""

    def __init__(self, source: tuple[str, str, str], target: str):
        domain, op_type, form = source
        super().__init__(f"convert {domain + '.' if domain else ''}{op_type}({form}) -> {target}")
        self.domain, self.op_type, self.form, self.target = domain, op_type, form, target

    def pattern(self, op, x):
        return getattr(op, self.op_type)(x, _domain=self.domain, _outputs=["y"], _allow_other_inputs=False)

    def check(self, context, x, y, **_):
        result = rw.MatchResult()
        attr = y.producer().attributes.get("approximate")
        approximate = attr.as_string() if attr is not None else "none"
        if self.domain == "" and approximate != ("tanh" if self.form == "tanh" else "none"):
            return result.fail(f"Gelu approximate={approximate!r} is not this rule's form", y)
        return result

    def rewrite(self, op, x, **_):
        return _gelu(op, x, self.form, self.target)


def gelu_rules(target: str) -> rw.RewriteRuleSet:
    rules = [
        GeluFusion.rule(form, alone, first, target)
        for form in ("tanh", "erf")
        for alone in ("x", "half", "s")
        for first in (True, False)
    ]
    rules += [GeluFusion.rule(form, "div2", False, target) for form in ("tanh", "erf")]
    return rw.RewriteRuleSet(rules)


def convert_rules(target: str) -> rw.RewriteRuleSet:
    sources = [("", "Gelu", "tanh"), ("", "Gelu", "erf")] if target == MS_DOMAIN else []
    if target == "onnx":
        sources = [(MS_DOMAIN, "FastGelu", "tanh"), (MS_DOMAIN, "Gelu", "erf")]
    return rw.RewriteRuleSet([ConvertFusedGelu.rule(source, target) for source in sources])


def _is_feature_vector(value: ir.Value | None, like: ir.Value) -> bool:
    """``value`` is shaped ``[hidden]`` (leading 1s allowed), ``hidden`` being ``like``'s last axis where known."""
    if value is None or value.shape is None or value.shape.rank() == 0:
        return False
    if any(d != 1 for d in list(value.shape)[:-1]):
        return False
    known = like.shape is not None and like.shape.rank() > 0 and isinstance(like.shape[-1], int)
    return not known or value.shape[-1] == like.shape[-1]


class CheckedLayerNormFusion(_layer_norm.LayerNormFusion):
    """onnxscript's LayerNorm fusion, refusing a "scale" that is an activation rather than a per-feature weight."""

    def check(self, context, x, scale, epsilon, **rest):
        if not _is_feature_vector(scale, x):
            return rw.MatchResult().fail(f"scale shape {scale.shape} is not [hidden]: not a LayerNorm weight", scale)
        return super().check(context, x=x, scale=scale, epsilon=epsilon, **rest)


class CheckedLayerNormBias(_layer_norm.LayerNormBiasFusion):
    """onnxscript's LayerNorm + bias fusion, refusing an added value that is not a per-feature constant bias."""

    def check(self, context, x, scale, bias, **_):
        result = rw.MatchResult()
        if not _is_constant(bias):
            return result.fail(f"the added {bias.name} is computed, not a constant bias", bias)
        if not _is_feature_vector(bias, x):
            return result.fail(f"the added {bias.name} has shape {bias.shape}, not [hidden]", bias)
        return result


def _is_constant(value: ir.Value) -> bool:
    """A constant, possibly behind ``Identity`` nodes (TorchScript shares equal weights that way)."""
    for _ in range(8):
        if get_const_value(value) is not None:
            return True
        producer = value.producer()
        if producer is None or producer.op_type != "Identity":
            return False
        value = producer.inputs[0]
    return False


LAYER_NORM_RULES = rw.RewriteRuleSet([CheckedLayerNormFusion.rule(), CheckedLayerNormBias.rule()], commute=True)


def _explicit_keepdims(graph: ir.Graph) -> None:
    """``ReduceMean`` without ``keepdims`` keeps dims (the default); say so, as onnxscript's LayerNorm rule expects."""
    for node in graph:
        if node.op_type == "ReduceMean" and node.domain in ("", "ai.onnx") and "keepdims" not in node.attributes:
            node.attributes["keepdims"] = ir.AttrInt64("keepdims", 1)


class LayerNormGelu(GraphPass):
    """Decomposed LayerNorm -> ``LayerNormalization``; every Gelu spelling -> one Gelu op (``gelu`` target)."""

    name = "layernorm-gelu"
    summary = "decomposed LayerNorm -> LayerNormalization; every Gelu spelling -> one Gelu op"

    @classmethod
    def emitted(cls, options) -> frozenset[tuple[str, str]]:
        """ORT's ``FastGelu`` / ``Gelu`` for ``gelu="com.microsoft"`` (or ``"auto"`` below opset 20); else standard."""
        return (
            frozenset()
            if options.get("gelu", "auto") == "onnx"
            else frozenset({(MS_DOMAIN, "FastGelu"), (MS_DOMAIN, "Gelu")})
        )

    def __init__(self, gelu: str = "auto"):
        if gelu not in GELU_TARGETS:
            raise ValueError(f"gelu must be one of {', '.join(GELU_TARGETS)}; got {gelu!r}")
        self.gelu = gelu
        self.near_misses: list[str] = []

    def call(self, model: ir.Model) -> CountedResult:
        opset = onnx_opset(model)
        target = self.gelu if self.gelu != "auto" else ("onnx" if opset >= 20 else MS_DOMAIN)
        if target == "onnx" and opset < 20:
            raise ValueError(f"gelu='onnx' needs ONNX opset >= 20 (Gelu); this model imports opset {opset}")
        layernorm = bias = 0
        if opset >= 17:
            _explicit_keepdims(model.graph)
            before = _count(model.graph, "LayerNormalization")
            rewrites = LAYER_NORM_RULES.apply_to_model(model)
            layernorm = _count(model.graph, "LayerNormalization") - before
            bias = rewrites - layernorm  # a trailing bias Add folded into a LayerNormalization
        fusion, conversion = gelu_rules(target), convert_rules(target)
        fused = fusion.apply_to_model(model)
        converted = conversion.apply_to_model(model)
        if layernorm or bias or fused or converted:  # the constants the decomposed forms read are dead now
            common.RemoveUnusedNodesPass()(model)
        self.near_misses = rule_misses(model, [LAYER_NORM_RULES, fusion])
        for miss in self.near_misses:
            log.info("layernorm-gelu: not fused: %s", miss)
        return self.result(
            model, layernorm_fused=layernorm, bias_folded=bias, gelu_fused=fused, gelu_converted=converted
        )


def _count(graph: ir.Graph, op_type: str) -> int:
    return sum(1 for n in graph if n.op_type == op_type and n.domain in ("", "ai.onnx"))

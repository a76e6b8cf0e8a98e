"""Residual Add + norm as one ONNX Runtime kernel: ``SkipSimplifiedLayerNormalization`` / ``SkipLayerNormalization``.

Why: every pre-norm block adds its sublayer's output to the residual stream and normalises the sum at once
(``norm(x + f(x))``), twice per layer. As two ops the sum is written to memory and read back, and each op pays its
own dispatch; at batch-1 decode that is 2 x layers small kernels a token. ORT's ``Skip*`` kernels compute the sum and
the norm in one pass and still return the sum (their fourth output) for the next residual Add.

The rules are onnxscript's own (``onnxscript.rewriter.ort_fusions.skip_normalization``): ``Add(input, skip)`` (either
order, optionally with a bias Add before or after) feeding ``SimplifiedLayerNormalization`` or ``LayerNormalization``
over the last axis, with ``input`` and ``skip`` both ``[B, S, D]`` and the weights ``[D]``. Run it after
``rmsnorm-fuse`` / ``layernorm-gelu``, which produce the single norm ops it matches. Where a candidate is refused, the
reason is kept in ``near_misses`` (and logged). Graph inputs/outputs unchanged; idempotent.
"""

from __future__ import annotations

import logging

import onnx_ir as ir
from onnx_ir.passes import common
from onnxscript.rewriter.ort_fusions.skip_normalization import (
    skip_layer_normalization_ruleset,
    skip_rms_normalization_ruleset,
)

from qgraph.graph_utils import MS_DOMAIN
from qgraph.pass_manager import CountedResult, GraphPass
from qgraph.verify import rule_misses

log = logging.getLogger(__name__)


class SkipNormFusion(GraphPass):
    """``norm(a + b)`` -> one ``com.microsoft`` Skip*Normalization node that also returns ``a + b``."""

    name = "skip-norm"
    emits = frozenset({(MS_DOMAIN, "SkipSimplifiedLayerNormalization"), (MS_DOMAIN, "SkipLayerNormalization")})
    summary = "residual Add + RMSNorm/LayerNorm -> one com.microsoft Skip(Simplified)LayerNormalization"

    def __init__(self) -> None:
        self.near_misses: list[str] = []

    def call(self, model: ir.Model) -> CountedResult:
        rms = skip_rms_normalization_ruleset.apply_to_model(model)
        layer = skip_layer_normalization_ruleset.apply_to_model(model)
        if rms or layer:
            model.opset_imports.setdefault(MS_DOMAIN, 1)
            common.RemoveUnusedNodesPass()(model)
        self.near_misses = rule_misses(model, [skip_rms_normalization_ruleset, skip_layer_normalization_ruleset])
        for miss in self.near_misses:
            log.info("skip-norm: not fused: %s", miss)
        return self.result(model, skip_rmsnorm_fused=rms, skip_layernorm_fused=layer)

"""Passes with a contract, pipelines as data, and a report for every pass run.

A qgraph pass is an ``onnx_ir`` in-place pass (``requires`` / ``call`` / ``ensures``) with a registered name, typed
keyword options, and counts of what it changed. ``run_pipeline`` applies a list of ``PassSpec`` to an in-memory
``ir.Model`` (no protobuf round trips) and returns one ``PassReport`` per pass.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import onnx_ir as ir
from onnx_ir.passes import InPlacePass, PassResult, PostconditionError, PreconditionError

from qgraph.errors import GraphPatternError, QGraphError
from qgraph.pipeline_spec import PassReport, PassSpec, parse_pipeline  # noqa: F401 - re-exported for plugins
from qgraph.registry import Registry, pass_registry


@dataclass
class CountedResult(PassResult):
    """``PassResult`` plus the pass's own counts, e.g. ``{"kv_scatters": 24}``, and why candidates were left alone.

    ``misses``: one line per candidate the pass looked at and refused, with the reason (``"Softmax n_12: the scores'
    keys are not ..."``); ``qgraph optimize --explain`` lists them.
    """

    counts: dict[str, int] = field(default_factory=dict)
    misses: list[str] = field(default_factory=list)


class GraphPass(InPlacePass):
    """Base class of qgraph passes. Subclasses set ``name`` and implement ``call`` returning ``CountedResult``."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    # (domain, op_type) of the ops beyond standard ONNX this pass writes: the standard pipeline gives the pass only to
    # targets that execute them (``Capabilities.executes``)
    emits: ClassVar[frozenset[tuple[str, str]]] = frozenset()

    @classmethod
    def emitted(cls, options: Mapping[str, Any]) -> frozenset[tuple[str, str]]:
        """What the pass writes when run with ``options`` (a pass whose options choose its output overrides this)."""
        return cls.emits

    def result(self, model: ir.Model, **counts: int) -> CountedResult:
        return CountedResult(model, modified=any(counts.values()), counts=dict(counts))


def op_histogram(model: ir.Model) -> collections.Counter[str]:
    """Op types over the main graph and every function body (domain-qualified when not the default domain)."""
    hist: collections.Counter[str] = collections.Counter()
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        hist[f"{node.domain}::{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type] += 1
    return hist


def instantiate(spec: PassSpec, registry: Registry) -> GraphPass:
    cls = registry.get(spec.name)
    try:
        return cls(**dict(spec.options))
    except TypeError as exc:
        raise QGraphError(f"pass {spec.name!r}: bad options {dict(spec.options)}: {exc}") from exc


def run_pipeline(
    model: ir.Model,
    specs: Iterable[PassSpec],
    registry: Registry | None = None,
    verify: Callable[[ir.Model, ir.Model], float] | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[PassReport]:
    """Apply ``specs`` in order to ``model`` in place; return a report per pass.

    ``verify(before, after)`` (optional) returns the max abs output difference of the two graphs; when given, each
    pass is run on a copy first so the difference can be measured.
    """
    registry = registry or pass_registry()
    reports = []
    for spec in specs:
        graph_pass = instantiate(spec, registry)
        if progress:
            progress(f"pass {spec.name} ...")
        before_hist = op_histogram(model)
        before_copy = model.clone() if verify else None
        start = time.perf_counter()
        try:
            result = graph_pass(model)
        except (PreconditionError, PostconditionError) as exc:
            cause = exc.__cause__ or exc
            raise GraphPatternError(f"pass {spec.name!r}: {cause}") from exc
        seconds = time.perf_counter() - start
        after_hist = op_histogram(result.model)
        delta = {
            op: after_hist[op] - before_hist[op]
            for op in sorted(set(before_hist) | set(after_hist))
            if after_hist[op] != before_hist[op]
        }
        report = PassReport(
            name=spec.name,
            seconds=seconds,
            nodes_before=sum(before_hist.values()),
            nodes_after=sum(after_hist.values()),
            op_delta=delta,
            counts=dict(getattr(result, "counts", {})),
            modified=result.modified,
            misses=list(getattr(result, "misses", [])),
        )
        if verify is not None and before_copy is not None:
            report.max_abs_diff = verify(before_copy, result.model)
        reports.append(report)
    return reports


def format_reports(reports: list[PassReport], explain: bool = False) -> str:
    """A fixed-width table, one row per pass; with ``explain``, each refused candidate and its reason below it."""
    lines = [f"{'pass':<24}{'time s':>8}{'nodes':>14}  counts / op delta"]
    for r in reports:
        counts = ", ".join(f"{k}={v}" for k, v in r.counts.items())
        delta = " ".join(f"{op}{v:+d}" for op, v in r.op_delta.items())
        diff = f"  max|diff|={r.max_abs_diff:.2e}" if r.max_abs_diff is not None else ""
        lines.append(
            f"{r.name:<24}{r.seconds:>8.2f}{r.nodes_before:>7}->{r.nodes_after:<6}  {counts}{diff}"
            + (f"\n{'':<48}{delta}" if delta else "")
        )
        if explain:
            lines += [f"{'':<4}not fused: {miss}" for miss in r.misses]
    return "\n".join(lines)

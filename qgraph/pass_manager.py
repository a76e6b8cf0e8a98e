"""Passes with a contract, pipelines as data, and a report for every pass run.

A qgraph pass is an ``onnx_ir`` in-place pass (``requires`` / ``call`` / ``ensures``) with a registered name, typed
keyword options, and counts of what it changed. ``run_pipeline`` applies a list of ``PassSpec`` to an in-memory
``ir.Model`` (no protobuf round trips) and returns one ``PassReport`` per pass.
"""

from __future__ import annotations

import collections
import json
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import onnx_ir as ir
from onnx_ir.passes import InPlacePass, PassResult, PostconditionError, PreconditionError

from qgraph.errors import GraphPatternError, QGraphError
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


@dataclass(frozen=True)
class PassSpec:
    """One pipeline step: a registered pass name and its options."""

    name: str
    options: Mapping[str, Any] = field(default_factory=dict)

    def key(self) -> str:
        return json.dumps({"name": self.name, "options": dict(self.options)}, sort_keys=True, default=str)


@dataclass
class PassReport:
    name: str
    seconds: float
    nodes_before: int
    nodes_after: int
    op_delta: dict[str, int]
    counts: dict[str, int]
    modified: bool
    max_abs_diff: float | None = None  # filled when numeric verification was asked for
    misses: list[str] = field(default_factory=list)  # candidates the pass refused, each with its reason

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def op_histogram(model: ir.Model) -> collections.Counter[str]:
    """Op types over the main graph and every function body (domain-qualified when not the default domain)."""
    hist: collections.Counter[str] = collections.Counter()
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        hist[f"{node.domain}::{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type] += 1
    return hist


def parse_pipeline(text_or_path: str | Path) -> list[PassSpec]:
    """``"a,b,c"`` or a JSON/YAML file: ``[{"name": "a", "options": {...}}, "b"]`` (or ``{"passes": [...]}``)."""
    path = Path(text_or_path).expanduser()
    if path.suffix in {".json", ".yaml", ".yml"}:
        if not path.is_file():
            raise QGraphError(f"pipeline file {path} does not exist")
        import yaml  # YAML is a superset of JSON

        try:
            data = yaml.safe_load(path.read_text())
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise QGraphError(f"pipeline file {path} is not valid YAML/JSON: {' '.join(str(exc).split())}") from exc
        items = data.get("passes", []) if isinstance(data, dict) else data
        if not isinstance(items, list):
            raise QGraphError(f"pipeline file {path} holds {type(items).__name__}; it must list passes: [a, b, ...]")
        specs = []
        for item in items:
            if isinstance(item, str):
                specs.append(PassSpec(item))
            elif isinstance(item, dict) and "name" in item:
                specs.append(PassSpec(item["name"], dict(item.get("options") or {})))
            else:
                raise QGraphError(f"pipeline file {path}: entry {item!r} is neither a name nor {{name, options}}")
        return specs
    return [PassSpec(n.strip()) for n in str(text_or_path).split(",") if n.strip()]


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

"""Passes written against onnx-graphsurgeon, run inside a qgraph pipeline.

Many graph rewrites already exist as onnx-graphsurgeon functions: take a ``gs.Graph``, edit it in place, done. The
adapter turns such a function into a registered qgraph pass (a ``GraphPass`` class) without touching its code::

    @graphsurgeon_pass(name="drop-identity")
    def drop_identity(graph: gs.Graph) -> dict[str, int]:
        ...
        return {"removed": n}

    # pyproject.toml of the plugin:  [project.entry-points."qgraph.passes"]  drop-identity = "my_plugin:drop_identity"

The function receives the graph (and the pass's options as keyword arguments) and may return counts for the report,
``None``, or a new ``gs.Graph``. The adapter then runs graph surgeon's own ``cleanup().toposort()`` and puts the
result back into the pipeline's model in place (graph, functions and opsets; the model's metadata is kept).

The price: the model crosses to protobuf and back around each such pass (with its weights loaded into memory), which
native ``onnx_ir`` passes avoid. onnx-graphsurgeon is imported only when such a pass runs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import onnx_ir as ir

from qgraph.errors import QGraphError
from qgraph.pass_manager import CountedResult, GraphPass


def _import_gs():
    try:
        import onnx_graphsurgeon as gs
    except ImportError as exc:
        raise QGraphError(
            "this pass is written for onnx-graphsurgeon, which is not installed: pip install onnx-graphsurgeon"
        ) from exc
    return gs


def replace_model_contents(model: ir.Model, new: ir.Model) -> None:
    """Make ``model`` hold ``new``'s graph, functions and opsets (the pipeline keeps a reference to ``model``)."""
    model.graph = new.graph
    model.functions.clear()
    model.functions.update(new.functions)
    model.ir_version = max(model.ir_version, new.ir_version)


class GraphSurgeonPass(GraphPass):
    """A qgraph pass around an onnx-graphsurgeon function; subclasses are made by ``graphsurgeon_pass``."""

    function: ClassVar[Callable[..., Any]]

    def __init__(self, **options: Any):
        self.options = options

    def call(self, model: ir.Model) -> CountedResult:
        gs = _import_gs()
        loaded = ir.external_data.load_to_model(model)  # graph surgeon reads weights as numpy arrays
        graph = gs.import_onnx(ir.to_proto(loaded))
        nodes_before = len(graph.nodes)
        returned = type(self).function(graph, **self.options)
        if isinstance(returned, gs.Graph):
            graph = returned
        elif returned is not None and not isinstance(returned, Mapping):
            raise QGraphError(
                f"graph-surgeon pass {self.name!r} returned {type(returned).__name__}; "
                "expected None, a dict of counts or a gs.Graph"
            )
        counts = {str(k): int(v) for k, v in returned.items()} if isinstance(returned, Mapping) else {}
        graph.cleanup().toposort()
        counts.setdefault("nodes_delta", len(graph.nodes) - nodes_before)
        replace_model_contents(model, ir.from_proto(gs.export_onnx(graph)))
        # The function's own counts say whether it changed anything; without them, assume it did.
        modified = any(counts.values()) if isinstance(returned, Mapping) else True
        return CountedResult(model, modified=modified, counts=counts)


def graphsurgeon_pass(
    function: Callable[..., Any] | None = None, *, name: str, summary: str = ""
) -> type[GraphSurgeonPass] | Callable[[Callable[..., Any]], type[GraphSurgeonPass]]:
    """Wrap ``function(graph: gs.Graph, **options)`` as a registrable qgraph pass class named ``name``.

    Usable as a decorator (``@graphsurgeon_pass(name=...)``) or a call (``graphsurgeon_pass(fn, name=...)``).
    """

    def wrap(fn: Callable[..., Any]) -> type[GraphSurgeonPass]:
        doc = (fn.__doc__ or "").strip()
        return type(
            f"GraphSurgeon_{fn.__name__}",
            (GraphSurgeonPass,),
            {
                "name": name,
                "summary": summary or (doc.splitlines()[0] if doc else f"onnx-graphsurgeon pass {fn.__name__}"),
                "function": staticmethod(fn),
                "__doc__": doc or None,
                "__module__": fn.__module__,
            },
        )

    return wrap(function) if function is not None else wrap

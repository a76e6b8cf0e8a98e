"""Pipelines as data: a pass name with its options, parsed from ``a,b,c`` or a JSON/YAML file, and a pass's report.

Kept apart from the pass manager (which needs ``onnx_ir``) so that choosing a pipeline and finding its compiled
artifact in the cache import no graph library: a process that reuses an artifact stays small.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from qgraph.errors import QGraphError


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

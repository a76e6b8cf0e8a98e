"""Default pass pipelines, chosen from a backend's declared capabilities (data), never from its name."""

from __future__ import annotations

from typing import TYPE_CHECKING

from qgraph.pass_manager import PassSpec

if TYPE_CHECKING:
    from qgraph.backend_api import Capabilities, CompileOptions


def standard_pipeline(capabilities: Capabilities, options: CompileOptions) -> list[PassSpec]:
    """Retained-state KV for targets that keep state on the device, then graph cleanup."""
    specs = []
    if capabilities.retained_state:
        specs.append(PassSpec("kv-retained-state", {"ctx_len": options.ctx_len}))
    specs.append(PassSpec("cleanup"))
    return specs

"""What a backend is: capabilities as data, a default pipeline, and three verbs.

The core never names a backend. It asks the registry for one by name, reads its ``Capabilities`` to choose passes,
calls ``compile`` to write an artifact directory (the core handles caching and atomic writes), and ``load`` to get a
``DecoderSession`` that the runtime drives.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

import numpy as np

from qgraph.pipeline_spec import PassSpec

if TYPE_CHECKING:
    import onnx_ir as ir


@dataclass(frozen=True)
class Kernel:
    """An op a target has kernels for beyond standard ONNX, and the activation types those kernels take."""

    domain: str  # "" for ops a runtime registers in the default domain without ONNX defining them
    op_type: str
    dtypes: frozenset[str] = frozenset({"float32"})

    def __str__(self) -> str:
        return f"{self.domain + '::' if self.domain else ''}{self.op_type}[{','.join(sorted(self.dtypes))}]"


@dataclass(frozen=True)
class Capabilities:
    """Facts about a target: what it executes and how it runs a graph. The pipeline is derived from them and from
    what each pass declares it writes (``qgraph.pipelines``); no field names a pass or a policy."""

    retained_state: bool  # keeps KV buffers on the device between runs
    dtypes: frozenset[str]  # compute dtypes it accepts, e.g. {"float32", "float16"}
    kernels: frozenset[Kernel] = frozenset()  # ops beyond standard ONNX it executes (standard ONNX: all of it)
    # runs the graph node by node as written, with no whole-graph compiler of its own: every node saved is a dispatch
    # saved (a compiling target fuses and schedules for itself)
    runs_node_by_node: bool = False
    static_shapes: bool = False  # needs every shape fixed at compile time (it compiles specializations)
    # its sessions can run one row of a batch alone (``run_row``): continuous batching (``full_batch_size``)
    continuous_batching: bool = False

    def executes(self, domain: str, op_type: str, dtype: str = "float32") -> bool:
        """Whether the target declares a kernel for ``domain::op_type`` on ``dtype`` activations (asked of the ops
        beyond standard ONNX that passes write)."""
        domain = "" if domain == "ai.onnx" else domain
        return any(k.domain == domain and k.op_type == op_type and dtype in k.dtypes for k in self.kernels)

    def as_dict(self) -> dict[str, Any]:
        return {
            "retained_state": self.retained_state,
            "dtypes": sorted(self.dtypes),
            "kernels": sorted(map(str, self.kernels)),
            "runs_node_by_node": self.runs_node_by_node,
            "static_shapes": self.static_shapes,
            "continuous_batching": self.continuous_batching,
        }


@dataclass(frozen=True)
class CompileOptions:
    """Shapes every backend needs, plus backend-specific options kept as given (``extra``)."""

    prefill_seq_len: int = 32
    ctx_len: int = 128
    batch_size: int = 1
    num_cores: int = 16
    precision: str = "float32"
    extra: Mapping[str, Any] = field(default_factory=dict)
    full_batch_size: int | None = None  # continuous batching: KV slots decoded together (QEfficient's name)
    # speculative decoding: a verification run feeds k + 1 tokens per row and reads all their logits (QEfficient's name)
    num_speculative_tokens: int | None = None
    # options of the quantize-weights pass overriding the int8 / int4 defaults (qgraph.pipelines)
    quantization: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        from qgraph.errors import QGraphError
        from qgraph.validation import check_int

        for name, minimum in (("prefill_seq_len", 1), ("ctx_len", 2), ("batch_size", 1), ("num_cores", 1)):
            check_int(name, getattr(self, name), minimum)
        if self.full_batch_size is not None:
            check_int("full_batch_size", self.full_batch_size, 1)
        if self.num_speculative_tokens is not None:
            check_int("num_speculative_tokens", self.num_speculative_tokens, 1)
            if self.num_speculative_tokens + 1 > self.ctx_len:
                raise QGraphError(
                    f"num_speculative_tokens {self.num_speculative_tokens} needs runs of "
                    f"{self.num_speculative_tokens + 1} tokens, more than ctx_len {self.ctx_len}"
                )
        if not isinstance(self.precision, str):
            raise QGraphError(f"precision must be a string such as 'float32', got {self.precision!r}")
        if self.prefill_seq_len > self.ctx_len:
            raise QGraphError(f"prefill_seq_len {self.prefill_seq_len} is larger than ctx_len {self.ctx_len}")
        if self.quantization is not None and not isinstance(self.quantization, Mapping):
            raise QGraphError(
                f"quantization must be a dict of quantize-weights options, e.g. {{'head_bits': 8}}, "
                f"got {self.quantization!r}"
            )

    def key(self) -> dict[str, Any]:
        key = {
            "prefill_seq_len": self.prefill_seq_len,
            "ctx_len": self.ctx_len,
            "batch_size": self.batch_size,
            "num_cores": self.num_cores,
            "precision": self.precision,
            "extra": {k: self.extra[k] for k in sorted(self.extra)},
        }
        if self.full_batch_size is not None:  # only when set: artifacts compiled without it keep their keys
            key["full_batch_size"] = self.full_batch_size
        if self.num_speculative_tokens is not None:
            key["num_speculative_tokens"] = self.num_speculative_tokens
        if self.quantization:  # likewise
            key["quantization"] = {k: self.quantization[k] for k in sorted(self.quantization)}
        return key

    @property
    def verification_width(self) -> int:
        """Tokens per row of a verification run (``k + 1``); 1 without speculative decoding."""
        return (self.num_speculative_tokens or 0) + 1


@runtime_checkable
class DecoderSession(Protocol):
    """A compiled retained-state decoder: KV buffers live inside, the runtime feeds tokens and positions."""

    ctx_len: int
    prefill_seq_len: int
    device_seconds: float  # time spent inside the backend's run calls since the last reset
    # optional: how many positions per row the logits keep (``qgraph.runtime.logits_positions``); None = every one
    logits_positions: int | None

    def reset(self, batch_size: int) -> None:
        """Start a new generation for ``batch_size`` rows (KV buffers cleared)."""

    def run(self, input_ids: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        """Feed ``[b, s]`` tokens at ``[b, s]`` positions (-1 = padding); return float32 logits.

        ``[b, s, V]``, or ``[b, 1, V]`` holding each row's last valid token only (the ``last-token-logits`` pass).
        The caller may keep them; a session may also offer ``run_transient`` (same arguments), whose logits are only
        valid until its next run (``qgraph.runtime.transient_run``: decode loops use it to skip a copy a step).
        """


class Backend(Protocol):
    name: ClassVar[str]
    capabilities: ClassVar[Capabilities]
    # Options of CompileOptions.extra (or num_cores, ...) this backend acts on; others are accepted and noted.
    used_options: ClassVar[frozenset[str]]

    def pipeline(self, options: CompileOptions) -> list[PassSpec]:
        """The passes that make a vanilla export ready for this backend (``standard_pipeline`` of its capabilities,
        plus any lowering of its own it offers the passes)."""

    def compile(self, model: ir.Model, options: CompileOptions, artifact_dir: Path) -> None:
        """Write everything needed to run into ``artifact_dir`` (an empty directory the core will publish)."""

    def load(self, artifact_dir: Path, options: CompileOptions) -> DecoderSession:
        """A session over a compiled artifact."""

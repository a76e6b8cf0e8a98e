"""ONNX Runtime backend: the retained-state graph in an ``InferenceSession``, KV buffers kept as OrtValues.

KV buffers never pass through numpy between steps. When the graph lets them (every data read of ``past_*.{i}`` is
the one scatter or GroupQueryAttention that produces ``past_*.{i}_RetainedState``), each buffer is ONE OrtValue bound
as both the input and the output of that node: ORT's ScatterElements/ScatterND skip their input-to-output copy when
the two are the same memory, and GroupQueryAttention then writes into the shared buffer, so a step writes only the new
K/V rows in place (no per-token copy of the whole cache, half the memory).
Otherwise two sets of OrtValues are allocated per generation and swapped after each run (the outputs of step n are
bound as the inputs of step n+1): two IOBindings, one per direction, built once per generation.

A decode step costs the host as little as it can (it is a visible share of a ~5 ms int4 step): the token and
position arrays and the logits buffer of each run shape are allocated once, bound once (on the CPU provider, where ORT
reads a bound input's memory at run time), and rewritten in place; ``run_transient`` hands out the logits buffer itself
instead of a copy.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from qgraph import contract
from qgraph.backend_api import Capabilities, CompileOptions, Kernel
from qgraph.backends.ort_options import check_options, check_session_options
from qgraph.backends.ort_options import providers as requested_providers
from qgraph.backends.ort_options import session_options as _session_options
from qgraph.domains import MS_DOMAIN
from qgraph.errors import QGraphError
from qgraph.pipeline_spec import PassSpec
from qgraph.pipelines import standard_pipeline

if TYPE_CHECKING:
    import onnx_ir as ir

MODEL_FILE = "model.onnx"
SETTINGS_FILE = "ort_settings.json"


class OrtDecoderSession:
    """``DecoderSession`` over an ORT ``InferenceSession`` with IOBinding for the retained state."""

    def __init__(
        self,
        model_path: Path,
        settings: dict[str, Any],
        providers: list[str],
        prefill_seq_len: int,
        facts: dict[str, bool] | None = None,
    ):
        import onnxruntime as ort

        self._ort = ort
        self.session = ort.InferenceSession(str(model_path), _session_options(settings), providers=providers)
        self.prefill_seq_len = prefill_seq_len
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.state_names = contract.retained_inputs(inputs)
        self.state_shapes = {n: inputs[n].shape for n in self.state_names}
        self.state_dtypes = {n: _numpy_dtype(inputs[n].type) for n in self.state_names}
        self.ctx_len = int(self.state_shapes[self.state_names[0]][2])
        logits = self.session.get_outputs()[0]
        self.logits_name = logits.name
        self.vocab_size = logits.shape[-1] if isinstance(logits.shape[-1], int) else None
        self.logits_dtype = _numpy_dtype(logits.type)
        self._logits_buffers: dict[tuple[int, int], tuple[np.ndarray, Any]] = {}
        # the token and position arrays of each run shape, with their OrtValues (sharing the arrays' memory)
        self._feeds: dict[tuple[int, int], _Feed] = {}
        # ORT reads a bound CPU input's memory at run time but copies it at bind time for a device: there a run
        # rebinds its inputs
        self._inputs_read_at_run = self.session.get_providers() == ["CPUExecutionProvider"]
        facts = facts or graph_facts(model_path)  # recorded at compile: reading the graph again costs memory
        # logits layout (qgraph.runtime.row_logits): None = every column; n = the last min(s, n) tokens of each row
        # (last-token-logits: 1, or k + 1 for speculative verification)
        last_token_only = len(logits.shape) == 3 and logits.shape[1] == 1
        self.logits_positions: int | None = facts.get("logits_positions") or (1 if last_token_only else None)
        self.in_place = facts["in_place"]
        # ORT's CPU GroupQueryAttention takes a later prompt chunk (past context, s > 1) for one row at a time
        self.rows_one_by_one = facts["rows_one_by_one"]
        self.device_seconds = 0.0
        # numpy arrays behind the bound OrtValues (CPU OrtValues made from numpy share its memory)
        self._arrays: list[np.ndarray] = []
        self._next_arrays: list[np.ndarray] = []
        self._current: list = []
        self._next: list = []
        self._binding: _Binding | None = None
        self._bindings: tuple[_Binding, _Binding] | None = None  # ping-pong: this run's, the next run's

    def _zeros(self, batch_size: int) -> tuple[list[np.ndarray], list]:
        arrays = []
        for name in self.state_names:
            _, heads, ctx, dim = self.state_shapes[name]
            arrays.append(np.zeros((batch_size, heads, ctx, dim), dtype=self.state_dtypes[name]))
        return arrays, [self._ort.OrtValue.ortvalue_from_numpy(a) for a in arrays]

    def reset(self, batch_size: int) -> None:
        """Start a generation. Buffers of the same batch size are reused without clearing (allocating and zeroing
        them is ~3 ms of every TTFT at ctx_len 256): a slot is only attended after this generation wrote it, and a
        stale slot enters ``probs @ V`` as ``0 * value``, harmless because every value a step writes is finite
        (padding rows write zeros)."""
        if not self._current or self._current[0].shape()[0] != batch_size:
            self._arrays, self._current = self._zeros(batch_size)
            self._next_arrays, self._next = (self._arrays, self._current) if self.in_place else self._zeros(batch_size)
        self._binding = _Binding(self._bind(list(zip(self._current, self._next, strict=True))))
        self._bindings = None
        if not self.in_place:
            self._bindings = (self._binding, _Binding(self._bind(list(zip(self._next, self._current, strict=True)))))
        self.device_seconds = 0.0

    def _swap(self) -> None:
        """Ping-pong: this run's outputs are the next run's inputs."""
        self._current, self._next = self._next, self._current
        self._arrays, self._next_arrays = self._next_arrays, self._arrays
        self._bindings = self._bindings[1], self._bindings[0]
        self._binding = self._bindings[0]

    def _bind(self, state: list[tuple[Any, Any]]):
        binding = self.session.io_binding()
        binding.bind_output(self.logits_name, "cpu")  # first: get_outputs()[0] is the logits from now on
        for name, (cur, nxt) in zip(self.state_names, state, strict=True):
            binding.bind_ortvalue_input(name, cur)
            binding.bind_ortvalue_output(contract.retained_output_name(name), nxt)
        return binding

    def run(self, input_ids: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        """Trailing columns that are padding in every row are not run (their logits are zeros)."""
        return self._checked_run(input_ids, position_ids, copy=True)

    def run_transient(self, input_ids: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        """``run`` whose logits may be the session's own buffer, rewritten by the next run: for a caller that reads
        them before running again (a decode loop), it saves copying ``[b, s, V]`` floats every step."""
        return self._checked_run(input_ids, position_ids, copy=False)

    def _checked_run(self, input_ids: np.ndarray, position_ids: np.ndarray, copy: bool) -> np.ndarray:
        if self._binding is None:
            raise QGraphError("OrtDecoderSession.run before reset(batch_size)")
        width = input_ids.shape[1]
        last = int(position_ids.max(initial=-1))
        if width > self.ctx_len or last >= self.ctx_len:
            raise QGraphError(
                f"a run of {width} tokens up to position {last} does not fit ctx_len "
                f"{self.ctx_len} (positions 0..{self.ctx_len - 1}); compile with a larger ctx_len"
            )
        # a decode step (one column) has nothing to trim: each numpy call between two runs costs tens of us on the
        # caches the run has just flushed (benchmarks/int4_profile.py), a visible share of an ~8 ms int4 step
        ids, pos = (input_ids, position_ids) if width == 1 else _without_trailing_padding(input_ids, position_ids)
        if self.rows_one_by_one and ids.shape[0] > 1 and ids.shape[1] > 1 and pos[:, 0].max() > 0:
            logits = self._run_rows(ids, pos)
        else:
            logits = self._run(self._binding, ids, pos, copy)
        if not self.in_place:
            self._swap()
        if self.logits_positions is None and logits.shape[1] < width:
            logits = np.pad(logits, ((0, 0), (0, width - logits.shape[1]), (0, 0)))
        return logits

    def _run(self, binding: _Binding, ids: np.ndarray, pos: np.ndarray, copy: bool = True) -> np.ndarray:
        shape = ids.shape
        feed = self._feeds.get(shape)
        if feed is None:
            feed = self._feeds[shape] = _Feed.allocate(self._ort, shape)
        feed.ids[...] = ids
        feed.positions[...] = pos
        if binding.shape != shape or not self._inputs_read_at_run:
            binding.binding.bind_ortvalue_input(contract.INPUT_IDS, feed.ids_value)
            binding.binding.bind_ortvalue_input(contract.POSITION_IDS, feed.positions_value)
            binding.logits = self._logits_buffer(*shape)
            if binding.logits is not None:
                binding.binding.bind_ortvalue_output(self.logits_name, binding.logits[1])
            binding.shape = shape
        if binding.logits is None:  # ORT allocates the output (rebinding keeps its slot)
            binding.binding.bind_output(self.logits_name, "cpu")
        start = time.perf_counter()
        self.session.run_with_iobinding(binding.binding)
        self.device_seconds += time.perf_counter() - start
        if binding.logits is not None:  # copied unless asked not to (the next run rewrites the buffer); float32
            logits = binding.logits[0]
            return logits.astype(np.float32) if copy or logits.dtype != np.float32 else logits
        return binding.binding.get_outputs()[0].numpy().astype(np.float32, copy=False)

    def _logits_buffer(self, batch: int, width: int) -> tuple[np.ndarray, Any] | None:
        """A reused logits buffer when the output shape is known ahead: ``get_outputs`` wraps every output (all the
        KV buffers too), ~0.25 ms a step on a 30-layer model."""
        if self.vocab_size is None:
            return None
        shape = (batch, width if self.logits_positions is None else min(width, self.logits_positions))
        if shape not in self._logits_buffers:
            array = np.empty((*shape, self.vocab_size), dtype=self.logits_dtype)
            self._logits_buffers[shape] = (array, self._ort.OrtValue.ortvalue_from_numpy(array))
        return self._logits_buffers[shape]

    def run_row(self, row: int, input_ids: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        """Feed ``[1, s]`` tokens to batch row ``row`` alone, over that row's views of the shared KV buffers; the
        other rows' state is untouched (continuous batching: a request is prefilled into a free slot)."""
        if self._binding is None:
            raise QGraphError("OrtDecoderSession.run_row before reset(batch_size)")
        view = self._ort.OrtValue.ortvalue_from_numpy
        current = [view(a[row : row + 1]) for a in self._arrays]
        # ping-pong graphs may not write the buffer they read: into a scratch row, copied back after the run
        scratch = None if self.in_place else [np.empty_like(a[row : row + 1]) for a in self._arrays]
        following = current if scratch is None else [view(a) for a in scratch]
        ids, pos = _without_trailing_padding(input_ids, position_ids)
        logits = self._run(_Binding(self._bind(list(zip(current, following, strict=True)))), ids, pos)
        for array, new in zip(self._arrays, scratch or [], strict=False):
            array[row] = new[0]
        if self.logits_positions is None and logits.shape[1] < input_ids.shape[1]:
            logits = np.pad(logits, ((0, 0), (0, input_ids.shape[1] - logits.shape[1]), (0, 0)))
        return logits

    def _run_rows(self, ids: np.ndarray, pos: np.ndarray) -> np.ndarray:
        """A later prompt chunk of a batch, one row at a time over that row's views of the buffers."""
        view = self._ort.OrtValue.ortvalue_from_numpy
        rows: dict[int, np.ndarray] = {}
        for row in range(ids.shape[0]):
            current = [view(a[row : row + 1]) for a in self._arrays]
            if pos[row, 0] < 0:  # no token in this chunk: nothing to run, the state carries over
                for a, b in zip(self._arrays, self._next_arrays, strict=True):
                    if a is not b:
                        b[row] = a[row]
                continue
            following = current if self.in_place else [view(a[row : row + 1]) for a in self._next_arrays]
            binding = _Binding(self._bind(list(zip(current, following, strict=True))))
            row_ids, row_pos = _without_trailing_padding(ids[row : row + 1], pos[row : row + 1])
            rows[row] = self._run(binding, row_ids, row_pos)[0]
        some = next(iter(rows.values()))
        kept = self.logits_positions
        length = ids.shape[1] if kept is None else min(ids.shape[1], kept)
        logits = np.zeros((ids.shape[0], length, some.shape[-1]), dtype=np.float32)
        for row, values in rows.items():
            if kept is None:
                logits[row, : values.shape[0]] = values
            else:  # each row's last valid token last (a row's own run may be narrower)
                logits[row, length - values.shape[0] :] = values
        return logits


@dataclasses.dataclass
class _Binding:
    """An IOBinding and the run shape its token, position and logits OrtValues are bound for (None: none yet)."""

    binding: Any
    shape: tuple[int, ...] | None = None
    logits: tuple[np.ndarray, Any] | None = None  # the bound logits buffer and its OrtValue (None: ORT allocates)


@dataclasses.dataclass(frozen=True)
class _Feed:
    """The token and position arrays of one run shape and the OrtValues over their memory."""

    ids: np.ndarray
    positions: np.ndarray
    ids_value: Any
    positions_value: Any

    @classmethod
    def allocate(cls, ort, shape: tuple[int, ...]) -> _Feed:
        ids, positions = np.zeros(shape, np.int64), np.zeros(shape, np.int64)
        return cls(ids, positions, ort.OrtValue.ortvalue_from_numpy(ids), ort.OrtValue.ortvalue_from_numpy(positions))


def _without_trailing_padding(ids: np.ndarray, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Drop the trailing columns where every row is padding (position -1); at least one column stays."""
    real = np.flatnonzero((pos >= 0).any(axis=0))
    width = int(real[-1]) + 1 if real.size else 1
    return ids[:, :width], pos[:, :width]


def graph_facts(model_path: Path) -> dict[str, bool]:
    """What the session needs to know of the graph's structure (read without its weights): whether each KV buffer
    may be updated in place, and whether later prompt chunks must run row by row (ORT's CPU GroupQueryAttention)."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    graph = model.graph
    state_names = [i.name for i in graph.input if i.name.startswith("past_")]
    positions = next((int(p.value) for p in model.metadata_props if p.key == contract.LOGITS_POSITIONS_METADATA), None)
    return {
        "in_place": _state_updated_in_place(graph, state_names),
        "rows_one_by_one": any(n.op_type == "GroupQueryAttention" for n in graph.node),
        "logits_positions": positions,
    }


def _providers(options: CompileOptions) -> list[str]:
    """The ORT providers asked for (``providers=`` on compile: a name or a list), in priority order; the CPU by
    default."""
    return requested_providers(options)


FLOATS = frozenset({"float32", "float16"})
# Activation types ONNX Runtime 1.32 registers com.microsoft.GroupQueryAttention kernels for, per provider
# (CUDA: float16 / bfloat16 only, contrib_ops/cuda/bert/group_query_attention.cc).
_GQA_KERNEL_TYPES = {
    "CPUExecutionProvider": FLOATS,
    "CUDAExecutionProvider": frozenset({"float16"}),
}
# ONNX Runtime's kernels beyond standard ONNX that qgraph's passes write. A provider without one of these runs it on
# the CPU's kernel; only GroupQueryAttention is declared per provider, because placed on the CPU under a device
# provider it copies every layer's activations and KV to and from the device.
_CPU_KERNELS = frozenset(
    {
        Kernel("", "SimplifiedLayerNormalization", FLOATS),
        Kernel(MS_DOMAIN, "FastGelu", FLOATS),
        Kernel(MS_DOMAIN, "Gelu", FLOATS),
        Kernel(MS_DOMAIN, "SkipLayerNormalization", FLOATS),
        Kernel(MS_DOMAIN, "SkipSimplifiedLayerNormalization", FLOATS),
        Kernel(MS_DOMAIN, "RotaryEmbedding", FLOATS),
        Kernel(MS_DOMAIN, "MatMulNBits", FLOATS),
        Kernel(MS_DOMAIN, "GatherBlockQuantized", FLOATS),
    }
)


def kernels(provider: str) -> frozenset[Kernel]:
    """What ONNX Runtime executes with ``provider`` first in the providers list."""
    return _CPU_KERNELS | {Kernel(MS_DOMAIN, "GroupQueryAttention", _GQA_KERNEL_TYPES.get(provider, frozenset()))}


def _state_updated_in_place(graph, state_names: list[str]) -> bool:
    """True when each retained-state input is read (beyond Shape) only by the node producing its ``_RetainedState``, as
    the buffer that node updates (a scatter's data, GroupQueryAttention's past key/value).

    Then input and output may share one buffer: the node reads nothing of the old buffer that it does not keep.
    """
    import onnx

    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in graph.node for a in n.attribute):
        return False  # a subgraph might read a buffer too: keep the safe ping-pong
    outputs = {o.name for o in graph.output}
    readers: dict[str, list] = {n: [] for n in state_names}
    for node in graph.node:
        for index, name in enumerate(node.input):
            if name in readers and node.op_type != "Shape":
                readers[name].append((node, index))
    for name, uses in readers.items():
        if len(uses) != 1:
            return False
        node, index = uses[0]
        target = contract.retained_output_name(name)
        updates = contract.STATE_UPDATES.get((node.op_type, "" if node.domain == "ai.onnx" else node.domain), {})
        if index not in updates or node.output[updates[index]] != target or target not in outputs:
            return False
    return True


def _numpy_dtype(ort_type: str):
    return {"tensor(float)": np.float32, "tensor(float16)": np.float16}.get(ort_type, np.float32)


class OrtBackend:
    """ONNX Runtime on the CPU (or CUDA where onnxruntime-gpu is installed and ``providers`` asks for it)."""

    name: ClassVar[str] = "ort"
    capabilities: ClassVar[Capabilities] = Capabilities(
        retained_state=True,
        dtypes=frozenset({"float32", "float16", "int8", "int4"}),
        kernels=kernels("CPUExecutionProvider"),
        runs_node_by_node=True,
        continuous_batching=True,
    )
    used_options: ClassVar[frozenset[str]] = frozenset({"session_options", "providers"})

    @property
    def version(self) -> str:
        import onnxruntime as ort

        return ort.__version__

    def pipeline(self, options: CompileOptions) -> list[PassSpec]:
        """The standard pipeline for what ORT executes with the first provider asked for (``kernels``)."""
        provider = _providers(options)[0]
        return standard_pipeline(dataclasses.replace(self.capabilities, kernels=kernels(provider)), options)

    def check_options(self, options: CompileOptions) -> None:
        """Refuse bad ``providers`` or ``session_options`` before any export (the core calls this first)."""
        check_options(options)

    def compile(self, model: ir.Model, options: CompileOptions, artifact_dir: Path) -> None:
        settings = check_session_options(options.extra.get("session_options") or {})
        providers = _providers(options)
        import onnx_ir as ir

        ir.save(model, artifact_dir / MODEL_FILE, external_data=MODEL_FILE + ".data")
        facts = graph_facts(artifact_dir / MODEL_FILE)
        (artifact_dir / SETTINGS_FILE).write_text(
            json.dumps({"session_options": settings, "providers": providers, "graph": facts}, indent=2)
        )

    def load(self, artifact_dir: Path, options: CompileOptions) -> OrtDecoderSession:
        saved = json.loads((artifact_dir / SETTINGS_FILE).read_text())
        return OrtDecoderSession(
            artifact_dir / MODEL_FILE,
            saved["session_options"],
            saved["providers"],
            options.prefill_seq_len,
            saved.get("graph"),
        )

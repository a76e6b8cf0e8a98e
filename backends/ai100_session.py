"""A ``DecoderSession`` over a compiled Cloud AI 100 program, through the SDK's Python runtime (``qaicrt``).

Written against the runtime API as QEfficient's ``QAICInferenceSession`` uses it: a ``Qpc`` is loaded into a
``Program`` on a ``Context``; an ``ExecObj`` is given one ``QBuffer`` (and its dimensions) per binding of the program's
I/O descriptor, enqueued, waited for, and read back with ``getData``.

The KV cache never crosses the host link: every ``past_*`` input and ``*_RetainedState`` output is bound to an empty
buffer, which tells the runtime to skip the transfer, and ``-retained-state`` (in the compile command) keeps the
buffers on the device between runs. ``reset`` therefore clears nothing on the device, and needs not to: under the
retained-state contract a query at position ``p`` only reads KV slots ``<= p``, all of which this generation wrote
(prefill writes ``0..len-1``, each decode step writes its own position first); padding (position -1) writes a slot
that stays masked until decode overwrites it.

The SDK is imported on first use only (and its install paths added to ``sys.path`` then), so importing this module
costs nothing on a machine without the card.
"""

from __future__ import annotations

import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from qgraph.contract import BATCH_INDEX, INPUT_IDS, LOGITS, POSITION_IDS, retained_buffers
from qgraph.errors import QGraphError

SDK_PYTHON_PATHS = (f"/opt/qti-aic/dev/lib/{platform.machine()}", "/opt/qti-aic/dev/python")


def import_sdk() -> tuple[Any, Any]:
    """``(qaicrt, QAicApi_pb2)`` from the environment or the SDK's standard install; ``ImportError`` if absent."""
    for extra in SDK_PYTHON_PATHS:
        if Path(extra).is_dir() and extra not in sys.path:
            sys.path.append(extra)
    import QAicApi_pb2
    import qaicrt

    return qaicrt, QAicApi_pb2


def _numpy_dtypes(aicapi) -> dict[int, np.dtype]:
    names = {
        "FLOAT_TYPE": np.float32,
        "FLOAT_16_TYPE": np.float16,
        "INT64_I_TYPE": np.int64,
        "INT32_I_TYPE": np.int32,
        "INT32_Q_TYPE": np.int32,
        "INT16_Q_TYPE": np.int16,
        "INT8_Q_TYPE": np.int8,
        "UINT8_Q_TYPE": np.uint8,
        "INT8_TYPE": np.int8,
    }
    return {getattr(aicapi, k): np.dtype(v) for k, v in names.items() if hasattr(aicapi, k)}


class QAICDecoderSession:
    """The retained-state decoder on the card: tokens and positions in, logits out, KV kept on the device."""

    def __init__(
        self,
        qpc_dir: Path,
        device_ids: list[int],
        prefill_seq_len: int,
        ctx_len: int,
        batch_size: int,
        full_batch_size: int | None = None,
        num_speculative_tokens: int | None = None,
    ):
        qaicrt, aicapi = import_sdk()
        self._rt = qaicrt
        self.prefill_seq_len, self.ctx_len, self.batch_size = prefill_seq_len, ctx_len, batch_size
        self.device_seconds = 0.0
        ok = qaicrt.QStatus.QS_SUCCESS
        self.context = qaicrt.Context(qaicrt.QIDList(device_ids))
        self.queue = qaicrt.Queue(self.context, device_ids[0])
        qpc = qaicrt.Qpc(str(qpc_dir))
        status, descriptor = qpc.getIoDescriptor()
        if status != ok:
            raise QGraphError(f"Cloud AI 100 runtime could not read the I/O descriptor of {qpc_dir}")
        iodesc = aicapi.IoDesc()
        iodesc.ParseFromString(bytes(descriptor))
        properties = qaicrt.QAicProgramProperties()
        if len(device_ids) > 1:  # one program over several cards: the runtime maps it, no single device id
            properties.devMapping = ":".join(map(str, device_ids))
        self.program = qaicrt.Program(self.context, device_ids[0] if len(device_ids) == 1 else None, qpc, properties)
        if self.program.load() != ok:
            raise QGraphError(f"Cloud AI 100 runtime could not load {qpc_dir} on devices {device_ids}")
        self.program.activate()
        self.exec_obj = qaicrt.ExecObj(self.context, self.program)

        dtypes = _numpy_dtypes(aicapi)
        self.bindings = list(iodesc.selected_set.bindings)
        self.index = {b.name: b.index for b in self.bindings}
        self.dtype = {b.name: dtypes[b.type] for b in self.bindings}
        self.outputs = {b.name for b in self.bindings if b.dir == aicapi.BUFFER_IO_TYPE_OUTPUT}
        logits_dims = list(self.bindings[self.index[LOGITS]].dims)
        self.vocab_size = int(logits_dims[-1])
        # the logits layout (qgraph.runtime.logits_positions): [b, 1, V] in the program when the graph keeps only each
        # row's last valid token (last-token-logits); the last min(s, k + 1) when compiled for speculative decoding
        last_token = len(logits_dims) == 3 and int(logits_dims[1]) == 1
        self.logits_positions = (num_speculative_tokens + 1) if num_speculative_tokens else (1 if last_token else None)
        self.kv_names = retained_buffers(b.name for b in self.bindings)
        self.continuous_batching = BATCH_INDEX in self.index  # compiled with full_batch_size (kv-batch-index)
        self.full_batch_size = full_batch_size
        self.buffers = [qaicrt.QBuffer(bytes(b.size)) for b in self.bindings]
        self.dims = qaicrt.BufferDimensionsVecRef([(dtypes[b.type].itemsize, list(b.dims)) for b in self.bindings])
        for name in self.kv_names:  # empty buffers: the runtime skips the transfer, the data stays on the card
            self._bind(name, np.zeros(0, dtype=self.dtype[name]))

    def _bind(self, name: str, array: np.ndarray) -> None:
        i = self.index[name]
        self.buffers[i] = self._rt.QBuffer(array.tobytes())
        self.dims[i] = (array.itemsize, list(array.shape))

    def reset(self, batch_size: int) -> None:
        if self.continuous_batching and batch_size == self.full_batch_size:
            self.device_seconds = 0.0
            return
        if batch_size != self.batch_size:
            raise QGraphError(f"the program was compiled for batch_size {self.batch_size}, not {batch_size}")
        self.device_seconds = 0.0

    def run(self, input_ids: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        """Every row; on a continuous-batching program row ``i`` is KV slot ``i`` (``batch_index`` = 0..b-1)."""
        if self.continuous_batching:
            self._bind(BATCH_INDEX, np.arange(input_ids.shape[0], dtype=self.dtype[BATCH_INDEX])[:, None])
        return self._execute(input_ids, position_ids)

    def run_row(self, row: int, input_ids: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        """A batch-1 run into KV slot ``row`` (a continuous-batching program's prefill), the other slots untouched."""
        if not self.continuous_batching:
            raise QGraphError("this program was compiled without full_batch_size: it has no batch_index input")
        self._bind(BATCH_INDEX, np.array([[row]], dtype=self.dtype[BATCH_INDEX]))
        return self._execute(input_ids, position_ids)

    def _execute(self, input_ids: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        ok = self._rt.QStatus.QS_SUCCESS
        batch, seq = input_ids.shape
        rows = seq if self.logits_positions is None else min(seq, self.logits_positions)
        self._bind(INPUT_IDS, np.ascontiguousarray(input_ids, dtype=self.dtype[INPUT_IDS]))
        self._bind(POSITION_IDS, np.ascontiguousarray(position_ids, dtype=self.dtype[POSITION_IDS]))
        self._bind(LOGITS, np.zeros((batch, rows, self.vocab_size), dtype=self.dtype[LOGITS]))
        start = time.perf_counter()
        if self.exec_obj.setData(self.buffers, self.dims) != ok:
            raise QGraphError("Cloud AI 100 runtime rejected the buffers (setData)")
        if self.queue.enqueue(self.exec_obj) != ok:
            raise QGraphError("Cloud AI 100 runtime could not enqueue the run")
        if self.exec_obj.waitForCompletion() != ok:
            raise QGraphError(
                f"Cloud AI 100 run failed for input shape {[batch, seq]}: the program was compiled for batch_size "
                f"{self.batch_size} and seq_len {self.prefill_seq_len} or 1"
            )
        status, out = self.exec_obj.getData()
        self.device_seconds += time.perf_counter() - start
        if status != ok:
            raise QGraphError("Cloud AI 100 runtime could not return the outputs (getData)")
        logits = np.frombuffer(bytes(out[self.index[LOGITS]]), dtype=self.dtype[LOGITS])
        return logits.reshape(batch, rows, self.vocab_size).astype(np.float32, copy=False)

"""A stand-in for the Cloud AI 100 SDK, for machines without the card: a compiler and the runtime's Python API.

It models only what the backend relies on, as the SDK documents it and QEfficient uses it:

- the compiler takes ``-flag[=value]`` arguments and writes ``<aic-binary-dir>/programqpc.bin``;
- the runtime (``qaicrt`` + ``QAicApi_pb2``) describes a program's bindings (name, index, direction, type, dims of
  the largest specialization, size), runs an ``ExecObj`` with one ``QBuffer`` per binding, rejects shapes no
  specialization allows, and keeps ``-retained-state`` buffers on the "device" between runs: a zero-size buffer means
  "no transfer", the device copy is used and updated.

The "device" executes the bundle's ONNX with ONNX Runtime and starts from garbage KV buffers (as real device memory
would), and counts the KV bytes that crossed the host link.
"""

from __future__ import annotations

import json
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FAKE_COMPILER = """#!{python}
import json, pathlib, sys
flags = dict((a.split("=", 1) + [True])[:2] for a in sys.argv[1:])
pathlib.Path("argv.json").write_text(json.dumps(sys.argv))
if "-fail" in flags:
    sys.exit("qaic-exec: error: the fake compiler was asked to fail")
out = pathlib.Path(flags["-aic-binary-dir"])
out.mkdir(parents=True, exist_ok=True)
(out / "programqpc.bin").write_text(json.dumps({{"model": flags["-m"],
    "specializations": flags["-network-specialization-config"], "custom_io": flags["-custom-IO-list-file"]}}))
"""


def write_fake_compiler(directory: Path) -> Path:
    path = directory / "qaic-exec"
    path.write_text(FAKE_COMPILER.format(python=sys.executable))
    path.chmod(0o755)
    return path


# -- QAicApi_pb2 ------------------------------------------------------------------------------------------------

FLOAT_TYPE, FLOAT_16_TYPE, INT64_I_TYPE, INT8_Q_TYPE = 1, 2, 3, 4
BUFFER_IO_TYPE_INPUT, BUFFER_IO_TYPE_OUTPUT = 0, 1
NUMPY = {FLOAT_TYPE: np.float32, FLOAT_16_TYPE: np.float16, INT64_I_TYPE: np.int64, INT8_Q_TYPE: np.int8}


@dataclass
class Binding:
    name: str
    index: int
    dir: int
    type: int
    dims: list[int]
    size: int


class IoDesc:
    def ParseFromString(self, data: bytes) -> None:  # noqa: N802 (protobuf's name)
        self.selected_set = types.SimpleNamespace(bindings=[Binding(**b) for b in json.loads(data)])


# -- qaicrt -----------------------------------------------------------------------------------------------------


class QStatus:
    QS_SUCCESS, QS_ERROR = 0, 1


class QBuffer:
    def __init__(self, data: bytes):
        self.data = bytes(data)
        self.size = len(self.data)

    def __bytes__(self) -> bytes:
        return self.data


class QIDList(list):
    pass


class BufferDimensionsVecRef(list):
    pass


class QAicProgramProperties:
    devMapping = ""


class Context:
    def __init__(self, devices=None):
        self.devices = list(devices or [0])


class Qpc:
    def __init__(self, path: str):
        self.dir = Path(path)
        self.bundle = self.dir.parent
        self.program = json.loads((self.dir / "programqpc.bin").read_text())
        self.specializations = json.loads((self.bundle / self.program["specializations"]).read_text())
        precisions = {}
        for line in (self.bundle / self.program["custom_io"]).read_text().splitlines():
            key, _, value = line.strip().lstrip("- ").partition(": ")
            if key == "IOName":
                name = value
            elif key == "Precision":
                precisions[name] = value
        self.precisions = precisions

    def getIoDescriptor(self):  # noqa: N802
        import onnxruntime as ort

        session = ort.InferenceSession(str(self.bundle / self.program["model"]), providers=["CPUExecutionProvider"])
        largest = max(self.specializations["specializations"], key=lambda s: int(s["seq_len"]))
        symbols = {k: int(v) for k, v in largest.items()}
        bindings = []
        for direction, values in (
            (BUFFER_IO_TYPE_INPUT, session.get_inputs()),
            (BUFFER_IO_TYPE_OUTPUT, session.get_outputs()),
        ):
            for value in values:
                dims = [symbols[d] if isinstance(d, str) else d for d in value.shape]
                kind = {"float16": FLOAT_16_TYPE, "mxint8": INT8_Q_TYPE}.get(self.precisions.get(value.name), None)
                if kind is None:
                    kind = INT64_I_TYPE if value.type == "tensor(int64)" else FLOAT_TYPE
                size = int(np.prod(dims)) * np.dtype(NUMPY[kind]).itemsize
                bindings.append(
                    dict(name=value.name, index=len(bindings), dir=direction, type=kind, dims=dims, size=size)
                )
        return QStatus.QS_SUCCESS, json.dumps(bindings).encode()


PROGRAMS: list[Program] = []


class Program:
    """The program loaded on the fake card: an ORT session plus the device-resident retained state."""

    def __init__(self, context, device, qpc: Qpc, properties):
        import onnxruntime as ort

        self.qpc, self.device, self.properties = qpc, device, properties
        self.session = ort.InferenceSession(str(qpc.bundle / qpc.program["model"]), providers=["CPUExecutionProvider"])
        status, data = qpc.getIoDescriptor()
        desc = IoDesc()
        desc.ParseFromString(data)
        self.bindings = desc.selected_set.bindings
        self.state: dict[str, np.ndarray] = {}
        self.kv_bytes_transferred = 0
        self.runs = 0
        self.loaded = self.active = False
        PROGRAMS.append(self)

    def load(self):
        self.loaded = True
        rng = np.random.default_rng(1)
        for b in self.bindings:  # device memory holds garbage until written
            if b.dir == BUFFER_IO_TYPE_INPUT and b.name.startswith("past_"):
                self.state[b.name] = rng.normal(0, 10, b.dims).astype(np.float32)
        return QStatus.QS_SUCCESS

    def activate(self):
        self.active = True
        return QStatus.QS_SUCCESS

    def allowed(self, batch: int, seq: int) -> bool:
        return any(
            int(s["batch_size"]) == batch and int(s["seq_len"]) == seq
            for s in self.qpc.specializations["specializations"]
        )

    def execute(self, buffers: list[QBuffer], dims: list) -> tuple[int, list[QBuffer]]:
        assert self.loaded and self.active
        feeds = {}
        for b in self.bindings:
            if b.dir != BUFFER_IO_TYPE_INPUT:
                continue
            buffer, (_, shape) = buffers[b.index], dims[b.index]
            if buffer.size == 0 and b.name in self.state:
                feeds[b.name] = self.state[b.name]
                continue
            array = np.frombuffer(bytes(buffer), dtype=NUMPY[b.type]).reshape(shape)
            if b.name.startswith("past_"):
                self.kv_bytes_transferred += buffer.size
                array = array.astype(np.float32)
            feeds[b.name] = array
        batch, seq = feeds["input_ids"].shape
        if not self.allowed(batch, seq):
            return QStatus.QS_ERROR, []
        self.runs += 1
        results = dict(zip([o.name for o in self.session.get_outputs()], self.session.run(None, feeds), strict=True))
        out = [QBuffer(b"") for _ in self.bindings]
        for b in self.bindings:
            if b.dir != BUFFER_IO_TYPE_OUTPUT:
                continue
            if b.name.endswith("_RetainedState"):
                self.state[b.name.removesuffix("_RetainedState")] = results[b.name]
            if buffers[b.index].size == 0:
                continue  # skipped: stays on the device
            data = results[b.name].astype(NUMPY[b.type]).tobytes()
            if b.name.startswith("past_"):
                self.kv_bytes_transferred += len(data)
            assert len(data) == buffers[b.index].size, f"{b.name}: host buffer of the wrong size"
            out[b.index] = QBuffer(data)
        return QStatus.QS_SUCCESS, out


class ExecObj:
    def __init__(self, context, program: Program):
        self.program = program
        self.status, self.outputs = QStatus.QS_ERROR, []

    def setData(self, buffers, dims):  # noqa: N802
        if len(buffers) != len(self.program.bindings) or len(dims) != len(buffers):
            return QStatus.QS_ERROR
        self.buffers, self.dims = list(buffers), list(dims)
        return QStatus.QS_SUCCESS

    def waitForCompletion(self):  # noqa: N802
        return self.status

    def getData(self):  # noqa: N802
        return QStatus.QS_SUCCESS, self.outputs


class Queue:
    def __init__(self, context, device):
        self.device = device

    def enqueue(self, exec_obj: ExecObj):
        exec_obj.status, exec_obj.outputs = exec_obj.program.execute(exec_obj.buffers, exec_obj.dims)
        return QStatus.QS_SUCCESS


def modules() -> dict[str, types.ModuleType]:
    """``{"qaicrt": ..., "QAicApi_pb2": ...}`` to place in ``sys.modules``."""
    this = sys.modules[__name__]
    qaicrt = types.ModuleType("qaicrt")
    for name in (
        "QStatus",
        "QBuffer",
        "QIDList",
        "BufferDimensionsVecRef",
        "QAicProgramProperties",
        "Context",
        "Qpc",
        "Program",
        "ExecObj",
        "Queue",
    ):
        setattr(qaicrt, name, getattr(this, name))
    aicapi = types.ModuleType("QAicApi_pb2")
    for name in ("IoDesc", "FLOAT_TYPE", "FLOAT_16_TYPE", "INT64_I_TYPE", "INT8_Q_TYPE"):
        setattr(aicapi, name, getattr(this, name))
    aicapi.BUFFER_IO_TYPE_INPUT, aicapi.BUFFER_IO_TYPE_OUTPUT = BUFFER_IO_TYPE_INPUT, BUFFER_IO_TYPE_OUTPUT
    return {"qaicrt": qaicrt, "QAicApi_pb2": aicapi}

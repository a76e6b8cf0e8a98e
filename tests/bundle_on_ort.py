"""A Cloud AI 100 bundle's graph run on ONNX Runtime: how tests prove the graph the card would compile."""

from __future__ import annotations

import json
from pathlib import Path

import onnx

from qgraph.backends.ai100_bundle import read_manifest
from qgraph.backends.ort import OrtDecoderSession
from qgraph.check import graph_session_on_ort


def bundle_session(directory: Path, workdir: Path) -> OrtDecoderSession:
    """The bundle's graph with the ``ctx_len`` of its specializations bound, in an ORT session."""
    ctx_len = json.loads((directory / "specializations.json").read_text())["specializations"][0]["ctx_len"]
    prefill_seq_len = read_manifest(directory)["prefill_seq_len"]
    return graph_session_on_ort(directory / "model.onnx", int(ctx_len), prefill_seq_len, workdir)


class ContinuousBatchingBundleSession:
    """A continuous-batching bundle's graph on ORT, driven by QEfficient's protocol: the KV buffers hold
    ``full_batch_size`` slots; a prefill is one row (``batch_size`` 1) with ``batch_index`` = its slot, a decode is all
    slots with ``batch_index`` = 0..full_batch_size-1. Every run's shape must be one of the specializations."""

    def __init__(self, directory: Path, workdir: Path):
        import numpy as np
        import onnxruntime as ort

        specs = json.loads((directory / "specializations.json").read_text())["specializations"]
        self.allowed = {(int(s["batch_size"]), int(s["seq_len"])) for s in specs}
        self.full_batch_size = int(specs[0]["full_batch_size"])
        self.ctx_len = int(specs[0]["ctx_len"])
        self.prefill_seq_len = read_manifest(directory)["prefill_seq_len"]
        model = onnx.load(str(directory / "model.onnx"))
        path = workdir / "cb-bundle-on-ort.onnx"
        onnx.save(model, str(path))
        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.kv = {}
        for value in self.session.get_inputs():
            if value.name.startswith("past_"):
                _, heads, _, dim = value.shape
                self.kv[value.name] = np.zeros((self.full_batch_size, heads, self.ctx_len, dim), np.float32)
        self.device_seconds = 0.0
        self._np = np

    def reset(self, batch_size: int) -> None:
        assert batch_size == self.full_batch_size

    def _run(self, ids, pos, batch_index):
        assert ids.shape in self.allowed, f"no specialization for shape {ids.shape}"
        feeds = {"input_ids": ids, "position_ids": pos, "batch_index": batch_index, **self.kv}
        names = [o.name for o in self.session.get_outputs()]
        outputs = dict(zip(names, self.session.run(names, feeds), strict=True))
        for name in self.kv:
            self.kv[name] = outputs[f"{name}_RetainedState"]
        return outputs["logits"].astype(self._np.float32)

    def run(self, input_ids, position_ids):
        batch_index = self._np.arange(input_ids.shape[0], dtype=self._np.int64)[:, None]
        return self._run(input_ids, position_ids, batch_index)

    def run_row(self, row, input_ids, position_ids):
        return self._run(input_ids, position_ids, self._np.array([[row]], dtype=self._np.int64))

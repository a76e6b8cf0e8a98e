"""A Cloud AI 100 bundle's graph run on ONNX Runtime: how tests prove the graph the card would compile."""

from __future__ import annotations

import json
from pathlib import Path

import onnx

from qgraph.backends.ai100_bundle import read_manifest
from qgraph.backends.ort import OrtDecoderSession


def bundle_session(directory: Path, workdir: Path) -> OrtDecoderSession:
    """The bundle's graph with ``ctx_len`` bound as the compiler binds it, in an ORT session (batch and seq_len stay
    symbolic: every run's shapes are one of the specializations)."""
    model = onnx.load(str(directory / "model.onnx"))
    ctx_len = json.loads((directory / "specializations.json").read_text())["specializations"][0]["ctx_len"]
    for value in list(model.graph.input) + list(model.graph.output):
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param == "ctx_len":
                dim.dim_value = int(ctx_len)
    path = workdir / "bundle-on-ort.onnx"
    onnx.save(model, str(path))
    prefill_seq_len = read_manifest(directory)["prefill_seq_len"]
    return OrtDecoderSession(path, {}, ["CPUExecutionProvider"], prefill_seq_len=prefill_seq_len)

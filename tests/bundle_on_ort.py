"""A Cloud AI 100 bundle's graph run on ONNX Runtime: how tests prove the graph the card would compile."""

from __future__ import annotations

import json
from pathlib import Path

from qgraph.backends.ai100_bundle import read_manifest
from qgraph.backends.ort import OrtDecoderSession
from qgraph.check import graph_session_on_ort


def bundle_session(directory: Path, workdir: Path) -> OrtDecoderSession:
    """The bundle's graph with the ``ctx_len`` of its specializations bound, in an ORT session."""
    ctx_len = json.loads((directory / "specializations.json").read_text())["specializations"][0]["ctx_len"]
    prefill_seq_len = read_manifest(directory)["prefill_seq_len"]
    return graph_session_on_ort(directory / "model.onnx", int(ctx_len), prefill_seq_len, workdir)

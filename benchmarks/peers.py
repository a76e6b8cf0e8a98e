"""The peers of the benchmark and how one job runs: each (model, setting, peer) in its own subprocess, in the peer's
own virtual environment where it needs one (``benchmarks/setup_peers.sh`` makes them)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
RUNNERS = HERE / "runners"
DEFAULT_PEERS_DIR = Path("/work/peers")  # where benchmarks/setup_peers.sh puts the peers' venvs by default


@dataclass
class Peer:
    name: str
    runner: str
    python: str  # interpreter path or "main"
    precision: str  # what the weights are while computing: fp32 / int8 / int4 / q4_1
    label: str
    models: tuple[str, ...] = ("gpt2", "smollm2")
    job: dict = field(default_factory=dict)


def peers(peers_dir: Path = DEFAULT_PEERS_DIR) -> dict[str, Peer]:
    venv = lambda name: str(peers_dir / name / "bin" / "python")  # noqa: E731
    table = [
        Peer("hf", "run_hf.py", "main", "fp32", "HF transformers eager (PyTorch)"),
        Peer("qgraph", "run_qgraph.py", "main", "fp32", "qgraph ORT float32", job={"precision": "float32"}),
        Peer(
            "qgraph-int8", "run_qgraph.py", "main", "int8", "qgraph ORT int8 (MatMulNBits)", job={"precision": "int8"}
        ),
        Peer(
            "qgraph-int4", "run_qgraph.py", "main", "int4", "qgraph ORT int4 (MatMulNBits)", job={"precision": "int4"}
        ),
        Peer("genai", "run_genai.py", "main", "fp32", "onnxruntime-genai fp32", models=("smollm2",)),
        Peer(
            "genai-int4",
            "run_genai.py",
            "main",
            "int4",
            "onnxruntime-genai int4",
            models=("smollm2",),
            job={"genai_precision": "int4"},
        ),
        Peer("llamacpp-f32", "run_llamacpp.py", venv("llamacpp"), "fp32", "llama.cpp f32 (GGUF from HF)"),
        Peer(
            "llamacpp-q4_1",
            "run_llamacpp.py",
            venv("llamacpp"),
            "q4_1",
            "llama.cpp Q4_1 (GGUF as shipped)",
            models=("smollm2",),
        ),
        Peer("optimum", "run_optimum.py", venv("optimum"), "fp32", "optimum-onnx ORTModelForCausalLM"),
    ]
    return {p.name: p for p in table}


DEFAULT_PEERS = "hf,qgraph,qgraph-int8,qgraph-int4,genai,genai-int4,llamacpp-f32,llamacpp-q4_1,optimum"
FP32_PEERS = ("genai", "llamacpp-f32", "optimum", "hf")


def run_job(peer: Peer, job: dict, timeout: int) -> dict:
    python = sys.executable if peer.python == "main" else peer.python
    if not Path(python).exists():
        return {"peer": peer.name, "status": "skipped", "reason": f"{python} not found: run benchmarks/setup_peers.sh"}
    with tempfile.TemporaryDirectory() as tmp:
        job_file, out_file = Path(tmp) / "job.json", Path(tmp) / "result.json"
        job_file.write_text(json.dumps(job))
        env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
        env.pop("PYTHONPATH", None)
        try:
            done = subprocess.run(
                [python, str(RUNNERS / peer.runner), str(job_file), str(out_file)],
                capture_output=True,
                text=True,
                timeout=timeout,
                env=env,
            )
        except subprocess.TimeoutExpired:
            return {"peer": peer.name, "status": "error", "reason": f"timed out after {timeout} s"}
        if not out_file.exists():
            return {"peer": peer.name, "status": "error", "reason": f"runner crashed: {done.stderr.strip()[-800:]}"}
        return json.loads(out_file.read_text())

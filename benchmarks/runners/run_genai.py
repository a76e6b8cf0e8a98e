"""Peer: onnxruntime-genai (its model builder turns the HF directory into its own ONNX graph; Llama family only).

The builder's output is cached beside the job's work directory. ``genai_config.json`` is edited for a fair run:
``intra_op_num_threads`` set to the job's threads (the default runs ~30% slower here), the EOS id moved to the last
vocabulary id (genai rejects ids outside the vocabulary; the runner reports an early stop if that id comes up) so the
generator does not stop at the real EOS (every peer generates exactly ``new_tokens``), ``max_length`` set.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import SkipPeer, main, measure, now  # noqa: E402

SUPPORTED = {"llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "gemma3_text", "olmo", "granite"}


def build(job: dict, out: Path) -> float:
    if (out / "genai_config.json").exists():
        return 0.0
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = now()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "onnxruntime_genai.models.builder",
            "-i",
            job["model_dir"],
            "-o",
            str(out),
            "-p",
            job.get("genai_precision", "fp32"),
            "-e",
            "cpu",
            "-c",
            str(out.parent / "builder-cache"),
        ],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise RuntimeError(f"model builder failed: {done.stderr.strip()[-800:]}")
    return now() - t0


def body(job: dict) -> dict:
    try:
        import onnxruntime_genai as og
    except ImportError as exc:
        raise SkipPeer(f"onnxruntime-genai is not installed ({exc}); run benchmarks/setup_peers.sh") from exc
    import numpy as np

    model_type = json.loads((Path(job["model_dir"]) / "config.json").read_text())["model_type"]
    if model_type not in SUPPORTED:
        raise SkipPeer(f"the onnxruntime-genai model builder does not support model_type {model_type!r}")
    out = Path(job["work_dir"]) / f"genai-{job['model_name']}-{job.get('genai_precision', 'fp32')}"
    export_s = build(job, out)
    config_path = out / "genai_config.json"
    config = json.loads(config_path.read_text())
    config["model"]["eos_token_id"] = config["model"]["vocab_size"] - 1  # not the real EOS: no early stop
    config["model"]["decoder"]["session_options"]["intra_op_num_threads"] = job["threads"]
    config["search"]["max_length"] = job["ctx_len"]
    config_path.write_text(json.dumps(config, indent=2))
    t0 = now()
    model = og.Model(str(out))
    load_s = now() - t0
    rows = np.array(job["prompt_ids"], dtype=np.int32)
    n_new = job["new_tokens"]

    def generate():
        start = now()
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=rows.shape[1] + n_new, do_sample=False, batch_size=rows.shape[0])
        generator = og.Generator(model, params)
        generator.append_tokens(rows)
        generator.generate_next_token()
        first = now()
        for _ in range(n_new - 1):
            generator.generate_next_token()
        end = now()
        tokens = [list(map(int, generator.get_sequence(i)[rows.shape[1] :])) for i in range(rows.shape[0])]
        if any(len(t) < n_new for t in tokens):
            raise RuntimeError(
                f"generation stopped early ({[len(t) for t in tokens]} tokens): the stand-in EOS came up"
            )
        return start, first, end, tokens

    result = measure(job, generate)
    return result | {
        "load_s": load_s,
        "export_s": export_s,
        "versions": {"onnxruntime-genai": og.__version__},
    }


if __name__ == "__main__":
    main("onnxruntime-genai", body)

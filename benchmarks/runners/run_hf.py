"""Peer: HF transformers, eager attention, PyTorch on the CPU (``model.generate``, greedy, EOS not stopping)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import main, measure, now  # noqa: E402


def body(job: dict) -> dict:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM
    from transformers.generation.streamers import BaseStreamer

    torch.set_num_threads(job["threads"])
    t0 = now()
    model = AutoModelForCausalLM.from_pretrained(job["model_dir"], attn_implementation="eager").eval()
    load_s = now() - t0
    model.generation_config.eos_token_id = None  # fixed-length greedy decode, like every peer
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    ids = torch.tensor(job["prompt_ids"], dtype=torch.long)

    class FirstToken(BaseStreamer):
        def __init__(self):
            self.calls, self.first = 0, None

        def put(self, value):
            self.calls += 1
            if self.calls == 2:  # the first put is the prompt, the second the first new token
                self.first = now()

        def end(self):
            pass

    def generate():
        streamer = FirstToken()
        start = now()
        with torch.inference_mode():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=job["new_tokens"],
                do_sample=False,
                pad_token_id=pad,
                streamer=streamer if ids.shape[0] == 1 else None,
            )
        end = now()
        first = streamer.first if streamer.first is not None else None
        if first is None:  # streamers take batch 1 only: time the first token with a one-token generate
            start2 = now()
            with torch.inference_mode():
                model.generate(
                    ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False, pad_token_id=pad
                )
            first = start + (now() - start2)
        return start, first, end, out[:, ids.shape[1] :].tolist()

    result = measure(job, generate)
    return result | {
        "load_s": load_s,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }


if __name__ == "__main__":
    main("hf", body)

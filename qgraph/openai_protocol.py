"""The OpenAI API's request and response shapes for completions and chat, and their mapping onto qgraph's options.

Field names and meanings follow the OpenAI API reference (``/v1/completions``, ``/v1/chat/completions``) so that
existing clients work unchanged. Sampling fields left out take the model's ``generation_config`` defaults (as
vLLM's server does); ``temperature: 0`` is greedy decoding.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from qgraph.errors import QGraphError

# qgraph's finish reasons -> OpenAI's: an EOS token and a stop string both end as "stop"
FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length", "cancelled": "stop"}


class SamplingFields(BaseModel):
    """What completions and chat share."""

    model_config = ConfigDict(extra="ignore")  # fields of the API that change nothing here (user, logit_bias, ...)

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    n: int = Field(default=1, ge=1, le=1)  # one choice per request
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    # an extra field (transformers' name): speculative decoding with prompt lookup, k guesses per step
    prompt_lookup_num_tokens: int | None = Field(default=None, ge=1)

    def engine_options(self) -> dict[str, Any]:
        """The generate options these fields mean (only those the request set)."""
        options: dict[str, Any] = {}
        if self.prompt_lookup_num_tokens is not None:
            options["prompt_lookup_num_tokens"] = self.prompt_lookup_num_tokens
        if self.max_tokens is not None:
            options["max_new_tokens"] = self.max_tokens
        if self.temperature is not None:
            if self.temperature == 0:
                options["do_sample"] = False
            else:
                options.update(do_sample=True, temperature=self.temperature)
        if self.top_p is not None:
            options["top_p"] = self.top_p
        if self.stop is not None:
            options["stop"] = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        if self.seed is not None:
            options["seed"] = self.seed
        return options


class CompletionRequest(SamplingFields):
    prompt: str | list[str]

    def text(self) -> str:
        if isinstance(self.prompt, list):
            if len(self.prompt) != 1:
                raise QGraphError("prompt: give one prompt per request (a list of one string at most)")
            return self.prompt[0]
        return self.prompt


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str


class ChatRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)

    def conversation(self) -> list[dict[str, str]]:
        return [m.model_dump() for m in self.messages]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_body(request_id: str, model: str, text: str, finish: str, prompt_n: int, completion_n: int) -> dict:
    return {
        "id": request_id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "text": text, "finish_reason": FINISH_REASONS[finish], "logprobs": None}],
        "usage": usage(prompt_n, completion_n),
    }


def chat_body(request_id: str, model: str, text: str, finish: str, prompt_n: int, completion_n: int) -> dict:
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": FINISH_REASONS[finish]}
        ],
        "usage": usage(prompt_n, completion_n),
    }


def completion_chunk(request_id: str, model: str, text: str, finish: str | None) -> dict:
    choice = {"index": 0, "text": text, "finish_reason": FINISH_REASONS.get(finish or "", None), "logprobs": None}
    return {"id": request_id, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [choice]}  # fmt: skip


def chat_chunk(request_id: str, model: str, delta: dict, finish: str | None) -> dict:
    choice = {"index": 0, "delta": delta, "finish_reason": FINISH_REASONS.get(finish or "", None)}
    return {"id": request_id, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [choice]}  # fmt: skip


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None) -> dict:
    """OpenAI's error object: what the official client raises as ``BadRequestError`` and friends."""
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}

"""Prompts to token ids: plain strings through the tokenizer, chat conversations through its chat template."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from qgraph.errors import QGraphError


def prompt_token_ids(tokenizer, prompts: Any = None, messages: Any = None) -> tuple[list[str], list[list[int]]]:
    """``(prompt texts, prompt ids)`` for ``prompts`` (a string or a list of them) or ``messages`` (one conversation,
    a list of ``{"role", "content"}`` dicts, or a list of conversations).

    A conversation's ids are exactly ``tokenizer.apply_chat_template(conversation, add_generation_prompt=True)``.
    """
    if (prompts is None) == (messages is None):
        raise QGraphError("give either prompts (text) or messages (chat conversations), not both and not neither")
    if messages is not None:
        return _chat_token_ids(tokenizer, messages)
    texts = [prompts] if isinstance(prompts, str) else prompts
    if not isinstance(texts, Sequence) or not texts:
        raise QGraphError(f"prompts must be a string or a non-empty list of strings, got {prompts!r}")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise QGraphError(f"prompt {i} is a {type(text).__name__}, not a string: {text!r}")
    return list(texts), [list(tokenizer(t)["input_ids"]) for t in texts]


def _chat_token_ids(tokenizer, messages: Any) -> tuple[list[str], list[list[int]]]:
    if not isinstance(messages, Sequence) or not messages:
        raise QGraphError("messages must be a list of {'role': ..., 'content': ...} dicts (or a list of such lists)")
    conversations = [messages] if isinstance(messages[0], Mapping) else list(messages)
    for i, conversation in enumerate(conversations):
        if not isinstance(conversation, Sequence) or not all(
            isinstance(m, Mapping) and "role" in m and "content" in m for m in conversation
        ):
            raise QGraphError(f"conversation {i} is not a list of {{'role': ..., 'content': ...}} dicts")
    if not getattr(tokenizer, "chat_template", None):
        raise QGraphError(
            f"the tokenizer ({type(tokenizer).__name__}) has no chat template, so messages cannot be formatted; "
            "pass prompts as text, or a tokenizer that has one (tokenizer.chat_template = '...')"
        )
    texts = [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in conversations]
    ids = [
        list(tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=True, return_dict=False))
        for c in conversations
    ]
    return texts, ids

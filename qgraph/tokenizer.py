"""A checkpoint's tokenizer without transformers: its ``tokenizer.json`` through the ``tokenizers`` library.

``AutoTokenizer`` imports torch (transformers' configuration classes do), which costs a process ~250 MB before any
token is read. A process that only generates from a compiled artifact needs none of that: this class reads the
same ``tokenizer.json``, ``tokenizer_config.json`` and chat template that ``AutoTokenizer`` reads and offers the part
of its interface ``generate`` uses (call, ``decode``, special token ids, ``apply_chat_template``), with the same ids.
Checkpoints without a ``tokenizer.json`` (slow, SentencePiece-only tokenizers) need ``AutoTokenizer``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from qgraph.checkpoint import expand_path
from qgraph.errors import QGraphError

SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken dict with ``content``."""
    if isinstance(value, Mapping):
        return value.get("content")
    return value if isinstance(value, str) else None


def _chat_template(directory: Path, config: Mapping[str, Any]) -> str | None:
    """The default chat template: ``chat_template.jinja`` beside the tokenizer, else the config's own."""
    file = directory / "chat_template.jinja"
    if file.is_file():
        return file.read_text()
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: the one called "default"
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    return template if isinstance(template, str) else None


class FastTokenizer:
    """``tokenizer.json`` with the special tokens and chat template of ``tokenizer_config.json``."""

    def __init__(self, directory: str | os.PathLike):
        from tokenizers import Tokenizer

        self.directory = expand_path(directory)
        file = self.directory / "tokenizer.json"
        if not file.is_file():
            raise QGraphError(
                f"{self.directory} has no tokenizer.json; load this tokenizer with transformers' AutoTokenizer"
            )
        self.backend = Tokenizer.from_file(str(file))
        config_file = self.directory / "tokenizer_config.json"
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        self.special_tokens = {name: _token_text(config.get(name)) for name in SPECIAL_TOKEN_NAMES}
        self.chat_template = _chat_template(self.directory, config)

    def _id(self, name: str) -> int | None:
        token = self.special_tokens.get(name)
        return self.backend.token_to_id(token) if token is not None else None

    @property
    def eos_token_id(self) -> int | None:
        return self._id("eos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self._id("pad_token")

    @property
    def bos_token_id(self) -> int | None:
        return self._id("bos_token")

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": self.encode(text, add_special_tokens)}

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self,
        conversation: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = False,
        tokenize: bool = True,
        return_dict: bool = False,
        **template_kwargs: Any,
    ) -> str | list[int] | dict[str, list[int]]:
        """The conversation rendered by the chat template as transformers renders it (Jinja, trimmed blocks, the
        special tokens as variables); its ids are the text's ids without added special tokens."""
        if not self.chat_template:
            raise QGraphError(f"the tokenizer in {self.directory} has no chat template")
        text = self._render(conversation, add_generation_prompt, template_kwargs)
        if not tokenize:
            return text
        ids = self.encode(text, add_special_tokens=False)
        return {"input_ids": ids} if return_dict else ids

    def _render(self, conversation, add_generation_prompt: bool, extra: Mapping[str, Any]) -> str:
        from jinja2.exceptions import TemplateError
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.globals.update(raise_exception=raise_exception, strftime_now=lambda f: datetime.now().strftime(f))
        variables = {k: v for k, v in self.special_tokens.items() if v is not None}
        try:
            return env.from_string(self.chat_template).render(
                messages=list(conversation), add_generation_prompt=add_generation_prompt, **variables, **extra
            )
        except TemplateError as exc:
            raise QGraphError(f"the chat template failed: {exc}") from exc


def load_tokenizer(directory: str | os.PathLike) -> FastTokenizer:
    """The tokenizer of a checkpoint directory, for ``generate``, without importing transformers or torch."""
    return FastTokenizer(directory)

"""Shared fixtures: tiny seeded models from transformers configs, a word-level tokenizer, an isolated cache."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the hub

from tests.tiny_models import TINY_CONFIGS, make_tiny_model, make_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("qgraph-cache")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """``tiny_model_dir(arch)`` -> a saved seeded random model directory (built once per session)."""
    built: dict[str, object] = {}

    def build(arch: str):
        if arch not in built:
            directory = tmp_path_factory.mktemp(f"tiny-{arch}")
            make_tiny_model(arch).save_pretrained(directory)
            built[arch] = directory
        return built[arch]

    return build


__all__ = ["TINY_CONFIGS"]

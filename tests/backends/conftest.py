"""Fixtures for backend tests: tiny models wrapped once per session, compiled through the shared cache."""

from __future__ import annotations

import pytest

from qgraph import QEFFAutoModelForCausalLM


@pytest.fixture(scope="session")
def qeff_model(tiny_model_dir, cache_dir):
    """``qeff_model(arch)`` -> a ``QEFFAutoModelForCausalLM`` over the tiny model (one per arch per session)."""
    made: dict[str, QEFFAutoModelForCausalLM] = {}

    def get(arch: str) -> QEFFAutoModelForCausalLM:
        if arch not in made:
            made[arch] = QEFFAutoModelForCausalLM.from_pretrained(
                str(tiny_model_dir(arch)), cache_dir=cache_dir, verbose=False
            )
        return made[arch]

    return get

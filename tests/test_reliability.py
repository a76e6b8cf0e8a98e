"""Bad inputs at the API and CLI edge: one QGraphError (CLI: one ``error:`` line, exit 2) naming the problem and
the fix, found before any export where it can be; never wrong output."""

from __future__ import annotations

import pytest

from qgraph import QEFFAutoModelForCausalLM
from qgraph.errors import QGraphError


@pytest.fixture(scope="module")
def tiny_gpt2(tiny_model_dir, cache_dir):
    return QEFFAutoModelForCausalLM.from_pretrained(str(tiny_model_dir("gpt2")), cache_dir=cache_dir, verbose=False)


def test_a_failed_recompile_leaves_the_model_uncompiled(tiny_gpt2, tokenizer):
    tiny_gpt2.compile(prefill_seq_len=8, ctx_len=40)
    with pytest.raises(QGraphError):
        tiny_gpt2.compile(prefill_seq_len=8, ctx_len=40, passes="no-such-pass")
    assert tiny_gpt2.artifact is None
    with pytest.raises(QGraphError, match="not compiled"):
        tiny_gpt2.generate(tokenizer, ["my name is"], generation_len=4, verbose=False)

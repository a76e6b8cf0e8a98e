"""``qgraph check``: a verdict from ``config.json`` alone (directories hold nothing else, so no weight is read).

Configs are transformers' defaults for each architecture, i.e. full-size (Llama 7B-like and so on): the check must
shrink them itself. Supported architectures must come out "converts, tokens exact"; unsupported ones must name the
stage and what was missing.
"""

from __future__ import annotations

import json
import re

import pytest
import transformers

from qgraph.check import TINY_VOCAB, check_model, tiny_config
from qgraph.cli import main

SUPPORTED = {
    "llama": ("LlamaConfig", {}),
    "qwen2": ("Qwen2Config", {}),
    "mistral": ("MistralConfig", {}),
    "gemma": ("GemmaConfig", {}),
    "gpt2": ("GPT2Config", {}),
    "phi3": ("Phi3Config", {}),
    "qwen3": ("Qwen3Config", {}),
    "gpt_neox": ("GPTNeoXConfig", {}),
    "starcoder2": ("Starcoder2Config", {}),
    "granite": ("GraniteConfig", {}),
}
UNSUPPORTED = {
    "jamba": ("JambaConfig", {"attn_layer_period": 2, "attn_layer_offset": 1}, "export", r"LinearAttention"),
    "llama-bidirectional": (
        "LlamaConfig",
        {"is_causal": False},
        "pass 'kv-retained-state'",
        r"no causal attention mask: .*attends bidirectionally",
    ),
}


def config_dir(tmp_path, class_name: str, overrides: dict):
    getattr(transformers, class_name)(**overrides).save_pretrained(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]
    return tmp_path


@pytest.mark.parametrize("arch", list(SUPPORTED))
def test_a_supported_architecture_converts_with_exact_tokens(arch, tmp_path):
    report = check_model(config_dir(tmp_path, *SUPPORTED[arch]))
    assert report.failure is None, report.format()
    assert report.tokens_exact and report.tokens_compared > 0, report.format()
    assert report.verdict.startswith("converts, tokens exact")
    fired = {p["name"] for p in report.passes if p["modified"]}
    assert "kv-retained-state" in fired and "group-query-attention" in fired


@pytest.mark.parametrize("arch", list(UNSUPPORTED))
def test_an_unsupported_architecture_names_the_stage_and_pattern(arch, tmp_path):
    class_name, overrides, stage, message = UNSUPPORTED[arch]
    report = check_model(config_dir(tmp_path, class_name, overrides))
    assert not report.converts
    assert report.failed_stage == stage
    assert re.search(message, report.failure), report.failure


def test_cli_prints_the_verdict_and_exits_by_it(tmp_path, capsys):
    good = config_dir(tmp_path / "good", "Qwen2Config", {})
    assert main(["check", str(good), "--json", str(tmp_path / "report.json")]) == 0
    out = capsys.readouterr().out
    assert "pass kv-retained-state" in out and "result: converts, tokens exact" in out
    assert json.loads((tmp_path / "report.json").read_text())["tokens_exact"] is True
    bad = config_dir(tmp_path / "bad", "LlamaConfig", {"is_causal": False})
    assert main(["check", str(bad)]) == 1
    assert "result: does not convert: fails at pass 'kv-retained-state'" in capsys.readouterr().out


def test_cli_names_a_missing_config(tmp_path, capsys):
    assert main(["check", str(tmp_path / "nowhere")]) == 2
    assert "error: no config.json at" in capsys.readouterr().err


def test_tiny_config_keeps_the_architecture_and_shrinks_the_sizes():
    config = transformers.Gemma3TextConfig(
        num_hidden_layers=6, vocab_size=262144, eos_token_id=[1, 106], num_key_value_heads=1
    ).to_dict()
    tiny = tiny_config(config)
    assert tiny["num_hidden_layers"] == 2 and tiny["hidden_size"] == 64 and tiny["vocab_size"] == TINY_VOCAB
    assert tiny["layer_types"] == [config["layer_types"][0], config["layer_types"][-1]]
    assert set(tiny["layer_types"]) == {"sliding_attention", "full_attention"}
    assert all(i < TINY_VOCAB for i in tiny["eos_token_id"]) and len(set(tiny["eos_token_id"])) == 2
    assert tiny["num_key_value_heads"] == 1  # multi-query stays multi-query
    for kept in ("rope_parameters", "final_logit_softcapping", "query_pre_attn_scalar", "model_type"):
        assert tiny.get(kept) == config.get(kept)

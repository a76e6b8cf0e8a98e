"""Bad inputs at the API and CLI edge: one QGraphError (CLI: one ``error:`` line, exit 2) naming the problem and
the fix, found before any export where it can be; never wrong output."""

from __future__ import annotations

import shutil

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


# -- checked before any export --------------------------------------------------------------------------------------


@pytest.fixture
def fresh(tiny_model_dir, tmp_path):
    """A model over an empty cache: a refusal before the export leaves that cache without an export."""
    return QEFFAutoModelForCausalLM.from_pretrained(str(tiny_model_dir("gpt2")), cache_dir=tmp_path, verbose=False)


def assert_nothing_exported(model) -> None:
    assert not (model.cache_dir / "exports").exists(), "the refusal came after an export"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"session_options": {"optimized_model_filepath": "x.onnx"}}, "not allowed.*allowed: .*intra_op_num_threads"),
        ({"session_options": {"profile_file_prefix": "/tmp/p"}}, "not allowed"),
        ({"session_options": {"intra_op_num_threads": "2"}}, "intra_op_num_threads.*must be an int"),
        ({"session_options": {"intra_op_num_threads": -1}}, "intra_op_num_threads.*>= 0"),
        ({"session_options": {"graph_optimization_level": 99}}, "graph_optimization_level.*one of"),
        ({"session_options": ["intra_op_num_threads"]}, "session_options must be a dict"),
        ({"providers": "NoSuchExecutionProvider"}, "unknown ONNX Runtime provider.*NoSuchExecutionProvider.*known"),
        ({"providers": 3}, "providers must be a provider name or a list"),
        ({"passes": "rmsnorm-fuse,cleanup"}, "no 'kv-retained-state' pass.*add it"),
        ({"passes": "kv-retained-state,no-such-pass"}, "unknown pass 'no-such-pass'"),
        ({"prefill_seq_len": "8"}, "prefill_seq_len must be an int"),
        ({"ctx_len": 64.0}, "ctx_len must be an int"),
        ({"batch_size": True}, "batch_size must be an int"),
        ({"num_cores": 0}, "num_cores must be >= 1"),
        ({"backend": "ai100", "precision": "float16", "num_devices": "2"}, "num_devices must be a positive integer"),
        ({"backend": "ai100", "precision": "float16", "mos": 1.5}, "mos must be a positive integer"),
        ({"backend": "ai100", "precision": "float16", "mxfp6_matmul": "yes"}, "mxfp6_matmul"),
        ({"backend": "ai100", "precision": "float16", "device_ids": [0, 1]}, "device_ids lists 2 card"),
    ],
)
def test_a_bad_compile_request_is_refused_before_the_export(fresh, options, message):
    with pytest.raises(QGraphError, match=message):
        fresh.compile(**{"prefill_seq_len": 8, "ctx_len": 40, **options})
    assert_nothing_exported(fresh)


def test_a_file_writing_session_option_touches_no_file(fresh, tmp_path):
    victim = tmp_path / "precious.onnx"
    victim.write_text("keep me")
    with pytest.raises(QGraphError):
        fresh.compile(prefill_seq_len=8, ctx_len=40, session_options={"optimized_model_filepath": str(victim)})
    assert victim.read_text() == "keep me"


def test_a_provider_given_as_one_name_is_one_provider(tiny_gpt2, tokenizer):
    """``--option providers=CPUExecutionProvider`` gives a string; it was saved as ["C", "P", "U", ...]."""
    import json

    directory = tiny_gpt2.compile(prefill_seq_len=8, ctx_len=40, providers="CPUExecutionProvider")
    assert json.loads((directory / "ort_settings.json").read_text())["providers"] == ["CPUExecutionProvider"]
    assert tiny_gpt2.generate(tokenizer, ["my name is"], generation_len=4, verbose=False).generated_ids[0]


def test_the_retained_state_pass_takes_the_compiles_ctx_len(tiny_gpt2, tmp_path):
    """Given by name, the pass built 128-slot buffers whatever ctx_len the compile asked for."""
    import onnx_ir as ir

    tiny_gpt2.compile(prefill_seq_len=8, ctx_len=40, passes="kv-retained-state,cleanup")
    past = next(v for v in ir.load(tiny_gpt2.onnx_path).graph.inputs if v.name.startswith("past_key"))
    assert past.shape[2] == 40
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text("- {name: kv-retained-state, options: {ctx_len: 64}}\n")
    with pytest.raises(QGraphError, match="ctx_len 64 but the compile's ctx_len is 40"):
        tiny_gpt2.compile(prefill_seq_len=8, ctx_len=40, passes=str(pipeline))


# -- prompts ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prompts", "message"),
    [
        ([1, 2], "prompt 0 is a int, not a string"),
        ("a \ud800 b", "prompt 0 is not valid text.*surrogate"),
        (["ok", "bad \udfff"], "prompt 1 is not valid text"),
        ("", "prompt 0 encodes to no tokens"),
        (b"my name", "must be a string or a list of strings"),
        (None, "give either prompts"),
        ([], "non-empty list"),
    ],
)
def test_a_bad_prompt_is_one_clear_error(tiny_gpt2, tokenizer, prompts, message):
    tiny_gpt2.compile(prefill_seq_len=8, ctx_len=40)
    with pytest.raises(QGraphError, match=message):
        tiny_gpt2.generate(tokenizer, prompts, generation_len=4, verbose=False)


def test_token_ids_beyond_the_vocabulary_name_the_tokenizer(tiny_gpt2, tokenizer, tmp_path):
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(tmp_path / "tok")
    other = AutoTokenizer.from_pretrained(tmp_path / "tok")
    other.add_tokens(["zebra"])  # id 128: one past the tiny model's vocabulary
    tiny_gpt2.compile(prefill_seq_len=8, ctx_len=40)
    with pytest.raises(QGraphError, match="token id 128 outside the model's vocabulary.*tokenizer"):
        tiny_gpt2.generate(other, ["my name is zebra"], generation_len=4, verbose=False)


# -- the command line: one ``error:`` line, exit 2 ----------------------------------------------------------------


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    from qgraph.cli import main

    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_error_line(code: int, err: str, pattern: str) -> None:
    import re

    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert re.search(pattern, lines[0]), lines[0]


@pytest.fixture(scope="module")
def small_onnx(tmp_path_factory):
    """A valid ONNX file (two inputs, one output, an initializer) and its bytes."""
    import numpy as np
    import onnx_ir as ir

    x = ir.Value(name="x", shape=ir.Shape([2]), type=ir.TensorType(ir.DataType.FLOAT))
    w = ir.Value(name="w", const_value=ir.tensor(np.ones(2, dtype=np.float32)))
    node = ir.node("Add", [x, w], num_outputs=1)
    node.outputs[0].name, node.outputs[0].shape, node.outputs[0].type = "y", ir.Shape([2]), x.type
    graph = ir.Graph([x], node.outputs, nodes=[node], initializers=[w], opset_imports={"": 20}, name="small")
    path = tmp_path_factory.mktemp("onnx") / "small.onnx"
    ir.save(ir.Model(graph, ir_version=10), path)
    return path


@pytest.mark.parametrize(
    ("content", "pattern"),
    [
        (b"\n\x00", "is not a valid ONNX model|without inputs or outputs"),  # the 2-byte file
        ("half", "is not a valid ONNX model"),  # a truncated file
        (b"", "is not a valid ONNX model|without inputs or outputs"),
    ],
)
def test_optimize_refuses_an_input_that_is_not_a_model(content, pattern, small_onnx, tmp_path, capsys):
    source = tmp_path / "in.onnx"
    whole = small_onnx.read_bytes()
    source.write_bytes(whole[: len(whole) // 2] if content == "half" else content)
    out = tmp_path / "out.onnx"
    code, _, err = run_cli(["optimize", str(source), "-o", str(out), "--passes", "cleanup"], capsys)
    assert_one_error_line(code, err, pattern)
    assert not out.exists()


def test_optimize_still_takes_a_valid_model(small_onnx, tmp_path, capsys):
    out = tmp_path / "out.onnx"
    code, _, err = run_cli(["optimize", str(small_onnx), "-o", str(out), "--passes", "cleanup"], capsys)
    assert code == 0, err
    assert out.exists()


@pytest.mark.parametrize(
    ("text", "pattern"),
    [("- [unclosed\n", "not valid YAML/JSON"), ("42\n", "must list passes"), ("- {options: {}}\n", "neither a name")],
)
def test_a_malformed_pipeline_file_is_one_error_line(text, pattern, small_onnx, tmp_path, capsys):
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(text)
    argv = ["optimize", str(small_onnx), "-o", str(tmp_path / "o.onnx"), "--passes", str(pipeline)]
    code, _, err = run_cli(argv, capsys)
    assert_one_error_line(code, err, pattern)


def test_a_cache_dir_that_is_a_file_is_one_error_line(tiny_model_dir, tmp_path, capsys):
    file = tmp_path / "file"
    file.write_text("")
    code, _, err = run_cli(["export", "--model", str(tiny_model_dir("gpt2")), "--cache-dir", str(file)], capsys)
    assert_one_error_line(code, err, "is a file, not a directory")


def test_tilde_paths_on_the_command_line_are_the_home_directory(
    tiny_model_dir, cache_dir, tmp_path, monkeypatch, capsys
):
    """A quoted ``~`` reaches qgraph unexpanded; it made a literal ``./~`` directory (cleaning that invites
    ``rm -rf ~``)."""
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    shutil.copytree(cache_dir / "exports", home / "qcache" / "exports")  # the export is cached already
    argv = ["export", "--model", str(tiny_model_dir("gpt2")), "--cache-dir", "~/qcache", "-o", "~/out/v.onnx"]
    code, out, err = run_cli(argv, capsys)
    assert code == 0, err
    assert (home / "out" / "v.onnx").is_file() and out.strip() == str(home / "out" / "v.onnx")
    assert not (tmp_path / "~").exists()


def test_a_missing_tokenizer_is_found_before_the_export(tiny_model_dir, tmp_path, capsys):
    cache = tmp_path / "cache"
    argv = ["infer", "--model", str(tiny_model_dir("gpt2")), "--prompt", "hi", "--cache-dir", str(cache)]
    code, _, err = run_cli([*argv, "--tokenizer", str(tmp_path / "no-tokenizer")], capsys)
    assert_one_error_line(code, err, "could not load a tokenizer.*--tokenizer")
    assert not (cache / "exports").exists()


def test_chat_without_a_chat_template_is_found_before_the_export(tiny_model_dir, tokenizer, tmp_path, capsys):
    cache = tmp_path / "cache"
    argv = ["infer", "--model", str(tiny_model_dir("gpt2")), "--prompt", "hi", "--cache-dir", str(cache), "--chat"]
    code, _, err = run_cli([*argv, "--tokenizer", tokenizer.name_or_path], capsys)
    assert_one_error_line(code, err, "no chat template.*drop --chat")
    assert not (cache / "exports").exists()


def test_a_closed_output_pipe_is_one_error_line_not_a_traceback():
    """``qgraph passes | head``: the reader is gone before qgraph prints (``true`` reads nothing)."""
    import subprocess
    import sys

    command = f"set -o pipefail; '{sys.executable}' -m qgraph.cli passes | true"
    done = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=120)
    assert "Traceback" not in done.stderr and "Exception ignored" not in done.stderr, done.stderr
    assert_one_error_line(done.returncode, done.stderr, "broken pipe")

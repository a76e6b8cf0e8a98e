"""The ``qgraph`` command line runs the whole workflow and lists its plugins."""

from __future__ import annotations

import json

import onnx_ir as ir

from qgraph.cli import main


def test_passes_lists_the_builtin_passes(capsys):
    assert main(["passes"]) == 0
    out = capsys.readouterr().out
    assert "kv-retained-state" in out and "cleanup" in out


def test_backends_lists_ort_with_capabilities(capsys):
    assert main(["backends"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("ai100") or "ort" in out
    assert "retained_state=True" in out


def test_infer_prints_text_and_stats(tiny_model_dir, tokenizer, cache_dir, tmp_path, capsys):
    tokenizer.save_pretrained(tmp_path / "tok")
    code = main(
        [
            "infer",
            "--model",
            str(tiny_model_dir("gpt2")),
            "--tokenizer",
            str(tmp_path / "tok"),
            "--prompt",
            "My name is",
            "--prompt-len",
            "8",
            "--ctx-len",
            "32",
            "--generation-len",
            "5",
            "--cache-dir",
            str(cache_dir),
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert out.startswith("My name is")
    assert "TTFT" in out and "Decode is=" in out and "tokens/sec" in out


def test_export_then_optimize_any_onnx_file(tiny_model_dir, cache_dir, tmp_path, capsys):
    vanilla = tmp_path / "vanilla.onnx"
    assert (
        main(["export", "--model", str(tiny_model_dir("llama")), "-o", str(vanilla), "--cache-dir", str(cache_dir)])
        == 0
    )
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text("passes:\n  - name: kv-retained-state\n    options: {ctx_len: 48}\n  - cleanup\n")
    out_path, report = tmp_path / "ready.onnx", tmp_path / "report.json"
    assert main(["optimize", str(vanilla), "-o", str(out_path), "--passes", str(pipeline), "--json", str(report)]) == 0
    reports = json.loads(report.read_text())
    assert [r["name"] for r in reports] == ["kv-retained-state", "cleanup"]
    assert reports[0]["counts"]["kv_scatters"] == 4  # 2 layers x (key, value)
    graph = ir.load(out_path).graph
    assert "attention_mask" not in [v.name for v in graph.inputs]
    assert graph.inputs[2].shape[2] == 48
    assert "kv-retained-state" in capsys.readouterr().out

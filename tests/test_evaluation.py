"""``qgraph eval``: strided perplexity through the compiled artifact equals HF transformers' own, computed directly
(HF's loss with ``-100`` labels over the same windows); the CLI prints it; bad input gets a clear error."""

from __future__ import annotations

import io
import json
import random

import numpy as np
import pytest

from qgraph import QEFFAutoModelForCausalLM
from qgraph.cli import main
from qgraph.errors import QGraphError
from qgraph.eval_text import common_licenses_text, file_text
from qgraph.evaluation import FLOAT32, HF, compile_for_evaluation, evaluate
from qgraph.perplexity import strided_windows
from qgraph.progress import ProgressBar
from tests.tiny_models import WORDS

CTX_LEN, STRIDE = 48, 20  # overlapping windows, a last one shorter than ctx_len
N_WORDS = 300  # the word-level tokenizer gives one token per word


@pytest.fixture(scope="module")
def text() -> str:
    rng = random.Random(0)
    return " ".join(rng.choice(WORDS) for _ in range(N_WORDS))


@pytest.fixture(scope="module")
def tiny_llama(tiny_model_dir, cache_dir):
    return QEFFAutoModelForCausalLM.from_pretrained(tiny_model_dir("llama"), cache_dir=cache_dir, verbose=False)


def hf_strided_perplexity(model_dir, ids: list[int], ctx_len: int, stride: int) -> float:
    """HF transformers' documented strided perplexity, each window's loss weighted by its exact target count."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    encodings = torch.tensor([ids])
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + ctx_len, len(ids))
        target_len = end - prev_end
        input_ids = encodings[:, begin:end]
        target_ids = input_ids.clone()
        target_ids[:, :-target_len] = -100
        with torch.no_grad():
            loss = model(input_ids, labels=target_ids).loss
        counted = int((target_ids[:, 1:] != -100).sum())  # the loss shifts labels by one inside the model
        nll_sum += float(loss) * counted
        n_tokens += counted
        prev_end = end
        if end == len(ids):
            break
    return float(np.exp(nll_sum / n_tokens))


def test_windows_score_every_token_after_the_first_once():
    windows = strided_windows(100, 48, 20)
    scored = [t for w in windows for t in range(w.first_target, w.end)]
    assert scored == list(range(1, 100))
    assert windows[-1].end == 100 and all(w.end - w.begin <= 48 for w in windows)
    # non-overlapping windows: a window's first token has no context in it and is not scored (as HF's label shift)
    disjoint = strided_windows(100, 40, 40)
    assert [(w.begin, w.first_target, w.end) for w in disjoint] == [(0, 1, 40), (40, 41, 80), (80, 81, 100)]


def test_eval_perplexity_equals_hf_transformers_on_the_same_windows(tiny_llama, tiny_model_dir, tokenizer, text):
    result = evaluate(tiny_llama, text, tokenizer, ctx_len=CTX_LEN, stride=STRIDE)
    ids = tokenizer(text)["input_ids"]
    expected = hf_strided_perplexity(tiny_model_dir("llama"), ids, CTX_LEN, STRIDE)
    assert result.perplexity == pytest.approx(expected, rel=1e-3)
    assert result.runs[HF].scores.perplexity == pytest.approx(expected, rel=1e-5)
    assert result.text_tokens == len(ids) == N_WORDS and result.scored_tokens == N_WORDS - 1
    assert result.windows == len(strided_windows(N_WORDS, CTX_LEN, STRIDE))
    # float32 qgraph is its own float32 reference; its top-1 ids are HF's (a float tie could flip one in 300)
    assert result.agreement[FLOAT32] == 1.0
    assert result.agreement[HF] >= 0.99
    again = evaluate(tiny_llama, text, tokenizer, ctx_len=CTX_LEN, stride=STRIDE)  # scores reused from the cache
    assert again.runs["evaluated"].reused and again.perplexity == result.perplexity


def test_eval_compiles_a_variant_with_every_position_logits(tiny_llama, text, tokenizer):
    """The default pipeline keeps the last position's logits only; the eval variant has its own artifact."""
    tiny_llama.compile(ctx_len=CTX_LEN, prefill_seq_len=CTX_LEN)
    artifact = compile_for_evaluation(tiny_llama, "ort", "float32", CTX_LEN)
    assert artifact.directory != tiny_llama.artifact.directory
    assert "last-token-logits" not in [r["name"] for r in artifact.reports]
    ids = np.asarray(tokenizer(text)["input_ids"][:CTX_LEN])[None]
    positions = np.arange(CTX_LEN)[None]
    for session, rows in ((artifact.load(), CTX_LEN), (tiny_llama.artifact.load(), 1)):
        session.reset(1)
        assert session.run(ids, positions).shape[:2] == (1, rows)


def test_int8_is_compared_with_float32_and_hf(tiny_llama, tokenizer, text):
    result = evaluate(tiny_llama, text, tokenizer, ctx_len=CTX_LEN, stride=STRIDE, precision="int8")
    float32 = evaluate(tiny_llama, text, tokenizer, ctx_len=CTX_LEN, stride=STRIDE, references=())
    assert result.runs[FLOAT32].scores.perplexity == float32.perplexity
    assert result.relative_change == pytest.approx(result.perplexity / float32.perplexity - 1)
    assert result.runs["evaluated"].artifact != result.runs[FLOAT32].artifact
    # weight-only int8 moves the tiny model's predictions a little, not to noise (measured: +0.6 %, 92 % agreement)
    assert abs(result.relative_change) < 0.05
    assert 0.8 < result.agreement[FLOAT32] < 1.0


def test_cli_eval_prints_the_perplexity_table_and_writes_json(tiny_model_dir, tokenizer, cache_dir, tmp_path, capsys):
    tokenizer.save_pretrained(tmp_path / "tok")
    rng = random.Random(1)
    (tmp_path / "text.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(120)))
    argv = ["eval", "--model", str(tiny_model_dir("llama")), "--tokenizer", str(tmp_path / "tok")]
    argv += ["--text", str(tmp_path / "text.txt"), "--ctx-len", str(CTX_LEN), "--stride", str(STRIDE)]
    argv += ["--references", "hf"]
    assert main([*argv, "--cache-dir", str(cache_dir), "--json", str(tmp_path / "eval.json")]) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert "scoring qgraph float32 (ort) 5/5 [########################]" in captured.err  # the progress bar's end
    report = json.loads((tmp_path / "eval.json").read_text())
    line = next(x for x in out.splitlines() if "perplexity" in x and "windows" in x)
    assert f"ctx_len {CTX_LEN} every {STRIDE} tokens" in line and "119 scored of 120" in line
    assert f"| {report['perplexity']:.4f} |" in out
    assert report["text_tokens"] == 120 and report["top1_agreement"]["hf"] >= 0.99


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--text", "/nonexistent/text.txt"], "text file /nonexistent/text.txt does not exist"),
        (["--ctx-len", "1"], "ctx_len must be >= 2"),
        (["--ctx-len", "16", "--stride", "32"], "stride 32 is larger than ctx_len 16"),
        (["--stride", "0"], "stride must be >= 1"),
        (["--references", "float32,gpt4"], "unknown 'gpt4'"),
    ],
)
def test_cli_eval_refuses_bad_input_with_one_error_line(tmp_path, capsys, args, message):
    assert main(["eval", "--model", str(tmp_path / "no-model"), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_progress_bar_prints_a_line_per_tenth_when_not_a_terminal():
    stream = io.StringIO()
    bar = ProgressBar("scoring x", 89, stream=stream)
    for _ in range(89):
        bar.advance()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 11 and lines[0].startswith("qgraph: scoring x 1/89 [") and "89/89 [" + "#" * 24 in lines[-1]


def test_text_sources_say_what_is_missing(tmp_path):
    with pytest.raises(QGraphError, match="--text FILE"):
        common_licenses_text(tmp_path / "common-licenses")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(QGraphError, match="is empty"):
        file_text(tmp_path / "empty.txt")
    (tmp_path / "GPL-3").write_text("one")
    (tmp_path / "GPL-2").write_text("two")
    joined = common_licenses_text(tmp_path, ("GPL-3", "GPL-2"))
    assert joined.text == "one\n\ntwo" and "GPL-3, GPL-2" in joined.source


def test_eval_refuses_a_text_of_one_token(tiny_llama, tokenizer):
    with pytest.raises(QGraphError, match="at least 2"):
        evaluate(tiny_llama, "hello", tokenizer, ctx_len=CTX_LEN, stride=STRIDE)

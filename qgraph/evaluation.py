"""``qgraph eval``: the perplexity of a compiled model on an English text, and how often its top-1 prediction agrees
with float32 qgraph's and with HF transformers'.

The compiled model is scored through the artifact and session ``generate`` uses (same backend, same passes, same
runtime), with one difference: the default pipeline's ``last-token-logits`` pass, which keeps only each row's last
logits row, is left out, so every position has logits. That variant is its own cache entry (its pipeline differs).

Windows follow HF transformers' strided perplexity (``qgraph.perplexity``): ``ctx_len`` tokens every ``stride``
tokens, each window run from an empty KV cache, scoring only its new tokens. The references are scored over the same
token ids and windows: float32 qgraph (the same backend's float32 eval variant) and HF transformers' float32 model.
Every run's scores (per-token log-likelihood and top-1 id) are cached, keyed by the artifact (or the checkpoint, for
HF), the text's token ids and the windows, so a sweep scores each reference once.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from qgraph.backend_api import CompileOptions
from qgraph.cache import digest, publish, reuse
from qgraph.compiler import CompiledArtifact, compile_onnx, default_pipeline, get_backend
from qgraph.errors import QGraphError
from qgraph.eval_text import EvalText, common_licenses_text
from qgraph.perplexity import (
    DEFAULT_CTX_LEN,
    DEFAULT_STRIDE,
    TokenScores,
    Window,
    check_windows,
    score_window,
    strided_windows,
)
from qgraph.pipeline_spec import PassSpec, parse_pipeline
from qgraph.progress import ProgressBar, note
from qgraph.prompts import prompt_token_ids
from qgraph.validation import check_token_ids

if TYPE_CHECKING:
    from qgraph.api import QEFFAutoModelForCausalLM

log = logging.getLogger(__name__)

FLOAT32, HF = "float32", "hf"
REFERENCES = (FLOAT32, HF)
EVALUATED = "evaluated"
LAST_TOKEN_LOGITS = "last-token-logits"
SCORES_FILE = "scores.npz"
SCORING_VERSION = 1  # bump when what a cached score means changes


@dataclass
class ScoredRun:
    """One model's scores over the windows, and how they were obtained."""

    label: str  # "qgraph int4 (ort)", "HF transformers float32"
    scores: TokenScores
    seconds: float  # time to score (0 when reused from the cache)
    reused: bool
    artifact: str | None = None  # the compiled artifact scored (qgraph runs)
    pipeline: list[dict[str, Any]] | None = None  # its passes with their options (qgraph runs)


@dataclass
class EvalResult:
    """Perplexity of the evaluated model and of its references over the same tokens, with top-1 agreements."""

    model: str
    backend: str
    precision: str
    text_source: str
    text_tokens: int
    ctx_len: int
    stride: int
    windows: int
    runs: dict[str, ScoredRun] = field(default_factory=dict)  # EVALUATED, then the references asked for

    @property
    def perplexity(self) -> float:
        return self.runs[EVALUATED].scores.perplexity

    @property
    def scored_tokens(self) -> int:
        return self.runs[EVALUATED].scores.count

    @property
    def agreement(self) -> dict[str, float]:
        """Top-1 agreement of the evaluated model with each reference (fraction of scored tokens)."""
        mine = self.runs[EVALUATED].scores
        return {name: mine.agreement(run.scores) for name, run in self.runs.items() if name != EVALUATED}

    @property
    def relative_change(self) -> float | None:
        """Perplexity relative to float32 qgraph's (0.02 = 2 % higher), when that reference was scored."""
        reference = self.runs.get(FLOAT32)
        return self.perplexity / reference.scores.perplexity - 1 if reference else None

    @property
    def method(self) -> str:
        return (
            f"{self.windows} windows of ctx_len {self.ctx_len} every {self.stride} tokens, each from an empty KV "
            f"cache scoring only its new tokens ({self.scored_tokens} scored of {self.text_tokens})"
        )

    def as_dict(self) -> dict[str, Any]:
        float32 = self.runs.get(FLOAT32)
        return {
            "model": self.model,
            "backend": self.backend,
            "precision": self.precision,
            "text": self.text_source,
            "text_tokens": self.text_tokens,
            "ctx_len": self.ctx_len,
            "stride": self.stride,
            "windows": self.windows,
            "scored_tokens": self.scored_tokens,
            "method": self.method,
            "perplexity": self.perplexity,
            "relative_change_vs_float32": self.relative_change,
            "top1_agreement": self.agreement,
            "runs": {
                name: {
                    "label": run.label,
                    "perplexity": run.scores.perplexity,
                    "mean_nll": float(run.scores.nll.mean()),
                    "relative_change_vs_float32": (
                        run.scores.perplexity / float32.scores.perplexity - 1 if float32 else None
                    ),
                    "top1_agreement": {
                        other: run.scores.agreement(o.scores) for other, o in self.runs.items() if other != name
                    },
                    "seconds": run.seconds,
                    "reused": run.reused,
                    "artifact": run.artifact,
                    "pipeline": run.pipeline,
                }
                for name, run in self.runs.items()
            },
        }

    def format_table(self) -> str:
        """The result as a Markdown table under two lines naming the text and the method."""
        references = [name for name in REFERENCES if name in self.runs]
        titles = {FLOAT32: "top-1 = float32", HF: "top-1 = HF"}
        lines = [
            f"model: {self.model}; text: {self.text_source}",
            f"perplexity over {self.method}",
            "",
            "| model | perplexity | vs float32 | " + " | ".join(titles[r] for r in references) + " |",
            "|---|---:|---:|" + "---:|" * len(references),
        ]
        float32 = self.runs.get(FLOAT32)
        shown = [EVALUATED] + [r for r in references if not _same_run(self.runs[r], self.runs[EVALUATED])]
        for name in shown:
            run = self.runs[name]
            change = f"{run.scores.perplexity / float32.scores.perplexity - 1:+.2%}" if float32 else "-"
            cells = [f"{run.scores.agreement(self.runs[r].scores):.2%}" for r in references]
            lines.append(f"| {run.label} | {run.scores.perplexity:.4f} | {change} | " + " | ".join(cells) + " |")
        return "\n".join(lines)


def _same_run(a: ScoredRun, b: ScoredRun) -> bool:
    return a is b or (a.artifact is not None and a.artifact == b.artifact)


def evaluate(
    model: QEFFAutoModelForCausalLM,
    text: str | EvalText | None = None,
    tokenizer: Any = None,
    *,
    ctx_len: int = DEFAULT_CTX_LEN,
    stride: int = DEFAULT_STRIDE,
    precision: str | None = None,
    backend: str | None = None,
    compile_options: Mapping[str, Any] | None = None,
    references: Sequence[str] = REFERENCES,
    verbose: bool | None = None,
) -> EvalResult:
    """Perplexity of ``model`` compiled at ``precision`` over ``text``, with top-1 agreement against
    ``references`` (``"float32"``: qgraph's float32 compile; ``"hf"``: HF transformers' float32 model).

    ``text`` is a string, an ``EvalText`` (text and source), or None for the licence texts of
    ``qgraph.eval_text.common_licenses_text``. ``tokenizer`` defaults to the checkpoint's. ``precision``, ``backend``
    and ``compile_options`` (``compile``'s backend options, ``passes`` and ``quantization`` included) default to the
    model's last compile, else float32 on ``ort``; the model's own artifact is left as it was. Windows: see
    ``qgraph.perplexity``.
    """
    check_windows(ctx_len, stride)
    unknown = [r for r in references if r not in REFERENCES]
    if unknown:
        raise QGraphError(f"unknown reference {unknown[0]!r}: choose from {', '.join(REFERENCES)}")
    verbose = model.verbose if verbose is None else verbose
    compiled = model.artifact.options if model.artifact is not None else None
    if precision is None:
        precision = compiled.precision if compiled else FLOAT32
    if backend is None:
        backend = model.artifact.backend.name if model.artifact is not None else "ort"
    if compile_options is None:
        compile_options = dict(compiled.extra) if compiled else {}
        if compiled and compiled.quantization:
            compile_options["quantization"] = dict(compiled.quantization)
    tokens = text_tokens(model, text, tokenizer, ctx_len, stride)
    result = EvalResult(
        model=str(model.checkpoint_directory or model.architecture),
        backend=backend,
        precision=precision,
        text_source=tokens.source,
        text_tokens=int(tokens.ids.size),
        ctx_len=ctx_len,
        stride=stride,
        windows=len(tokens.windows),
    )
    runs = result.runs
    runs[EVALUATED] = qgraph_scores(model, tokens, backend, precision, compile_options, verbose)
    if FLOAT32 in references:
        if precision == FLOAT32 and not compile_options:
            runs[FLOAT32] = runs[EVALUATED]
        else:
            runs[FLOAT32] = qgraph_scores(model, tokens, backend, FLOAT32, {}, verbose)
    if HF in references:
        runs[HF] = hf_scores(model, tokens, verbose)
    return result


@dataclass(frozen=True)
class TextTokens:
    """The token ids of the evaluation text, its windows, and a key naming both (for cached scores)."""

    ids: np.ndarray  # int64 [n]
    windows: list[Window]
    source: str
    ctx_len: int
    stride: int

    @property
    def key(self) -> dict[str, Any]:
        return {"ids": hashlib.sha256(self.ids.tobytes()).hexdigest(), "ctx_len": self.ctx_len, "stride": self.stride}


def text_tokens(
    model: QEFFAutoModelForCausalLM,
    text: str | EvalText | None,
    tokenizer: Any,
    ctx_len: int = DEFAULT_CTX_LEN,
    stride: int = DEFAULT_STRIDE,
) -> TextTokens:
    """``text`` (None: the default licence texts) as the model's token ids (the tokenizer's default special tokens)
    cut into windows; every model compared over it is fed exactly these ids."""
    check_windows(ctx_len, stride)
    if isinstance(text, str):
        text = EvalText(text, "text given")
    text = text if text is not None else common_licenses_text()
    tokenizer = tokenizer if tokenizer is not None else _checkpoint_tokenizer(model)
    ids = np.asarray(prompt_token_ids(tokenizer, text.text)[1][0], dtype=np.int64).reshape(-1)
    check_token_ids([ids], model.vocab_size)
    return TextTokens(ids, strided_windows(int(ids.size), ctx_len, stride), text.source, ctx_len, stride)


def compile_for_evaluation(
    model: QEFFAutoModelForCausalLM,
    backend: str,
    precision: str,
    ctx_len: int,
    compile_options: Mapping[str, Any] | None = None,
) -> CompiledArtifact:
    """``model`` compiled as ``compile`` would (``compile_options`` as its backend options; ``passes`` to override
    the pipeline) but without ``last-token-logits``: logits for every position, under its own cache key. The model's
    own artifact is not touched. One run takes a whole window (``prefill_seq_len = ctx_len``), batch 1."""
    target, options, specs = evaluation_pipeline(model, backend, precision, ctx_len, compile_options)
    source_key = model.source_key
    return compile_onnx(model.export, source_key, target, options, model.cache_dir, specs, verbose=model.verbose)


def evaluation_pipeline(
    model: QEFFAutoModelForCausalLM,
    backend: str,
    precision: str,
    ctx_len: int,
    compile_options: Mapping[str, Any] | None = None,
) -> tuple[Any, CompileOptions, list[PassSpec]]:
    """The backend, options and passes of ``compile_for_evaluation`` (the default pipeline, or ``passes`` from
    ``compile_options``, without ``last-token-logits``)."""
    from qgraph.registry import pass_registry
    from qgraph.validation import check_pipeline

    extra = dict(compile_options or {})
    passes = extra.pop("passes", None)
    quantization = extra.pop("quantization", None)
    target = get_backend(backend)
    options = CompileOptions(
        prefill_seq_len=ctx_len,
        ctx_len=ctx_len,
        batch_size=1,
        precision=precision,
        extra=extra,
        quantization=quantization,
    )
    check_backend_options = getattr(target, "check_options", None)
    if check_backend_options is not None:
        check_backend_options(options)
    specs = default_pipeline(target, options, model.cache_dir)
    if passes is not None:
        given = parse_pipeline(passes) if isinstance(passes, str) else [_as_spec(p) for p in passes]
        specs = check_pipeline(given, specs, ctx_len, pass_registry())
    return target, options, [s for s in specs if s.name != LAST_TOKEN_LOGITS]


def _as_spec(item: Any) -> PassSpec:
    return item if isinstance(item, PassSpec) else PassSpec(str(item))


def score_session(session, ids: np.ndarray, windows: Sequence[Window], bar: ProgressBar | None = None) -> TokenScores:
    """Each window through a ``DecoderSession`` from an empty cache (one run of the whole window), scored."""
    parts = []
    for window in windows:
        session.reset(1)
        tokens = ids[None, window.begin : window.end]
        positions = np.arange(window.end - window.begin, dtype=np.int64)[None]
        logits = session.run(tokens, positions)
        parts.append(score_window(logits[0], ids, window))
        if bar is not None:
            bar.advance()
    return TokenScores.concatenate(parts)


def score_torch_model(torch_model, ids: np.ndarray, windows: Sequence[Window], bar: ProgressBar | None = None):
    """Each window through a transformers causal LM (no cache), scored the same way."""
    import torch

    parts = []
    with torch.inference_mode():
        for window in windows:
            tokens = torch.from_numpy(ids[window.begin : window.end])[None]
            logits = torch_model(input_ids=tokens, use_cache=False).logits[0].float().numpy()
            parts.append(score_window(logits, ids, window))
            if bar is not None:
                bar.advance()
    return TokenScores.concatenate(parts)


def qgraph_scores(
    model: QEFFAutoModelForCausalLM,
    tokens: TextTokens,
    backend: str = "ort",
    precision: str = FLOAT32,
    compile_options: Mapping[str, Any] | None = None,
    verbose: bool = True,
) -> ScoredRun:
    """``model``'s eval variant (``compile_for_evaluation``) scored over ``tokens``; cached by artifact and tokens."""
    compile_options = dict(compile_options or {})
    artifact = compile_for_evaluation(model, backend, precision, tokens.ctx_len, compile_options)
    label = f"qgraph {precision} ({backend})" + (" " + _options_text(compile_options) if compile_options else "")
    key = digest({"artifact": artifact.directory.name, **tokens.key, "version": SCORING_VERSION})

    def score(bar: ProgressBar) -> TokenScores:
        return score_session(artifact.load(), tokens.ids, tokens.windows, bar)

    run = cached_scores(model.cache_dir / "eval" / f"qgraph-{key}", label, score, len(tokens.windows), verbose)
    run.artifact = str(artifact.directory)
    specs = evaluation_pipeline(model, backend, precision, tokens.ctx_len, compile_options)[2]
    run.pipeline = [{"name": s.name, "options": dict(s.options)} for s in specs]
    return run


def hf_scores(model: QEFFAutoModelForCausalLM, tokens: TextTokens, verbose: bool = True) -> ScoredRun:
    """HF transformers' float32 model of the same checkpoint scored over ``tokens``; cached by checkpoint and tokens
    (the key does not change with qgraph's code, so a sweep computes it once)."""
    key = digest({"source": model.source_key, "reference": "transformers-float32", **tokens.key, "v": SCORING_VERSION})

    def score(bar: ProgressBar) -> TokenScores:
        return score_torch_model(model.reference_model(), tokens.ids, tokens.windows, bar)

    directory = model.cache_dir / "eval" / f"hf-{key}"
    return cached_scores(directory, "HF transformers float32", score, len(tokens.windows), verbose)


def cached_scores(directory: Path, label: str, score, n_windows: int, verbose: bool) -> ScoredRun:
    """Scores from the cache entry ``directory``, or computed by ``score(bar)`` (``bar``: a progress bar over
    ``n_windows``) and published there."""
    if reuse(directory):
        try:
            with np.load(directory / SCORES_FILE) as data:
                scores = TokenScores(data["nll"], data["top1"])
            note(f"{label}: reusing scores cached in {directory}", verbose)
            return ScoredRun(label, scores, 0.0, reused=True)
        except (OSError, ValueError, KeyError) as exc:
            log.warning("cached scores in %s are unreadable (%s); scoring again", directory, exc)
    start = time.perf_counter()
    scores = score(ProgressBar(f"scoring {label}", n_windows, enabled=verbose))
    seconds = time.perf_counter() - start
    with publish(directory) as tmp:
        np.savez(tmp / SCORES_FILE, nll=scores.nll, top1=scores.top1)
    return ScoredRun(label, scores, seconds, reused=False)


def _options_text(options: Mapping[str, Any]) -> str:
    return "[" + ", ".join(f"{k}={v}" for k, v in sorted(options.items())) + "]"


def _checkpoint_tokenizer(model):
    """The checkpoint's tokenizer (``tokenizer.json`` without transformers when it has one)."""
    directory = model.checkpoint_directory
    if directory is None:
        raise QGraphError("a model made from a PyTorch object has no checkpoint tokenizer: pass tokenizer=...")
    from qgraph.tokenizer import load_tokenizer

    try:
        return load_tokenizer(directory)
    except QGraphError:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(directory))

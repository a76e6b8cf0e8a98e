"""``QEFFAutoModelForCausalLM``: the QEfficient-compatible front door (from_pretrained -> compile -> generate)."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from qgraph import __version__
from qgraph.backend_api import CompileOptions
from qgraph.cache import cache_root, digest, publish, reuse, tensor_digest
from qgraph.compiler import ONNX_FILE, CompiledArtifact, compile_onnx, get_backend, unused_options
from qgraph.decoding import generation_config_defaults, resolve_options
from qgraph.engine import Engine, RequestHandle
from qgraph.errors import ModelNotFoundError, QGraphError
from qgraph.pass_manager import PassSpec, parse_pipeline
from qgraph.progress import step
from qgraph.prompts import prompt_token_ids
from qgraph.registry import pass_registry
from qgraph.request import Request
from qgraph.runtime import GenerationResult, StepTimer, StreamEvent, latency_stats, static_batch_steps
from qgraph.stats import LatencyStats
from qgraph.validation import check_pipeline, check_prompts, check_token_ids

EXPORT_OPSET = 20
logger = logging.getLogger(__name__)


@contextlib.contextmanager
def _exporter_chatter_silenced() -> Iterator[None]:
    """The exporter's deprecation warnings and log lines are noise to a user; errors still surface as exceptions."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "transformers", "onnxscript")]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels, strict=True):
                lg.setLevel(level)


def _looks_like_path(name: str) -> bool:
    """Hub ids are ``name`` or ``org/name``; anything else (``./x``, ``/a/b``, ``a/b/c``) is a local path."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or Path(name).exists()


def load_hf_model(name_or_path: str, **hf_kwargs: Any):
    """``AutoModelForCausalLM.from_pretrained`` with eager attention (the graph form the passes read)."""
    from transformers import AutoModelForCausalLM

    hf_kwargs.setdefault("attn_implementation", "eager")
    if _looks_like_path(name_or_path) and not Path(name_or_path).expanduser().exists():
        raise ModelNotFoundError(f"model path {name_or_path!r} does not exist")
    try:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, **hf_kwargs)
    except (OSError, ValueError) as exc:
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        hint = (
            " (HF_HUB_OFFLINE is set, so only the local cache is searched)"
            if offline
            else " (not a local directory; the HuggingFace hub could not provide it)"
        )
        raise ModelNotFoundError(f"could not load model {name_or_path!r}{hint}: {exc}") from exc
    return model.eval()


class QEFFAutoModelForCausalLM:
    """A HuggingFace causal LM on its way to a backend: export, compile, generate.

    >>> model = QEFFAutoModelForCausalLM.from_pretrained("gpt2")
    >>> model.compile(num_cores=16)
    >>> model.generate(prompts=["Hi there!!"], tokenizer=tokenizer)
    """

    def __init__(self, model, cache_dir: str | Path | None = None, verbose: bool = True):
        self.model = model
        self.cache_dir = cache_root(cache_dir)
        self.verbose = verbose
        self._source_key: str | None = None
        self._vanilla_path: Path | None = None
        self.artifact: CompiledArtifact | None = None
        self._session = None
        self._generate_lock = threading.Lock()  # one session, one set of KV buffers: generate calls take turns
        self._engine: Engine | None = None

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str,
        *,
        cache_dir: str | Path | None = None,
        verbose: bool = True,
        **hf_kwargs: Any,
    ) -> QEFFAutoModelForCausalLM:
        """Load with transformers (same arguments as ``AutoModelForCausalLM.from_pretrained``)."""
        return cls(load_hf_model(str(pretrained_model_name_or_path), **hf_kwargs), cache_dir, verbose)

    # -- export -------------------------------------------------------------------------------------------------

    @property
    def source_key(self) -> str:
        """Digest of everything that shapes the vanilla export: class, config, weights, library versions."""
        if self._source_key is None:
            import torch
            import transformers

            self._source_key = digest(
                {
                    "class": type(self.model).__name__,
                    "config": self.model.config.to_dict(),
                    "weights": tensor_digest(self.model.state_dict().items()),
                    "torch": torch.__version__,
                    "transformers": transformers.__version__,
                    "qgraph": __version__,
                    "opset": EXPORT_OPSET,
                }
            )
        return self._source_key

    def export(self, verify: bool = False) -> Path:
        """The vanilla ONNX export (cached; a damaged entry is rebuilt, ``verify`` re-hashes it); returns its path."""
        directory = self.cache_dir / "exports" / f"{type(self.model).__name__}-{self.source_key}"
        if not reuse(directory, verify):
            import onnx_ir as ir

            from qgraph.export import export_vanilla

            params = sum(p.numel() for p in self.model.parameters()) / 1e6
            with (
                step(f"exporting {type(self.model).__name__} ({params:.1f}M parameters) to ONNX", self.verbose),
                _exporter_chatter_silenced(),
            ):
                exported = export_vanilla(self.model, opset=EXPORT_OPSET)
                with publish(directory) as tmp:
                    ir.save(exported, tmp / ONNX_FILE, external_data=ONNX_FILE + ".data")
        self._vanilla_path = directory / ONNX_FILE
        return self._vanilla_path

    # -- compile ------------------------------------------------------------------------------------------------

    def compile(
        self,
        backend: str = "ort",
        prefill_seq_len: int = 32,
        ctx_len: int = 128,
        batch_size: int = 1,
        num_cores: int | None = None,
        precision: str = "float32",
        passes: str | Sequence[str] | None = None,
        verify: bool = False,
        full_batch_size: int | None = None,
        **backend_options: Any,
    ) -> Path:
        """Export (if needed), run the backend's passes and compile; returns the artifact directory.

        Options a backend does not act on (e.g. ``num_cores`` on ONNX Runtime) are accepted and listed in a note.
        ``full_batch_size=N`` (QEfficient's name) compiles for continuous batching: ``generate`` and ``submit`` then
        run requests through an engine of N KV slots (``model.engine``).
        ``verify`` re-hashes every cached file reused instead of trusting unchanged sizes and mtimes. A compile that
        fails leaves the model uncompiled (never holding the previous artifact unannounced).
        """
        with self._generate_lock:
            if self._engine is not None:
                self._engine.close()
            self.artifact, self._session, self._engine = None, None, None
        target = get_backend(backend)
        if full_batch_size is not None and not target.capabilities.continuous_batching:
            raise QGraphError(
                f"backend {backend!r} does not support continuous batching (full_batch_size); compile without "
                "full_batch_size (static batches of batch_size), or for a backend that does (qgraph backends lists "
                "continuous_batching=True)"
            )
        options = CompileOptions(
            prefill_seq_len=prefill_seq_len,
            ctx_len=ctx_len,
            batch_size=batch_size,
            num_cores=16 if num_cores is None else num_cores,
            precision=precision,
            extra=backend_options,
            full_batch_size=full_batch_size,
        )
        explicit = ({"num_cores": num_cores} if num_cores is not None else {}) | backend_options
        ignored = unused_options(target, explicit)
        if ignored and self.verbose:
            print(f"qgraph: note: backend {backend!r} does not use {', '.join(ignored)} (ignored)", file=sys.stderr)
        # before the export, everything that can be checked is: a request the target refuses fails at once
        check_backend_options = getattr(target, "check_options", None)
        if check_backend_options is not None:
            check_backend_options(options)
        specs = target.pipeline(options)
        if passes is not None:
            given = parse_pipeline(passes) if isinstance(passes, str) else [PassSpec(p) for p in passes]
            specs = check_pipeline(given, specs, options.ctx_len, pass_registry())
        vanilla = self.export(verify)
        self.artifact = compile_onnx(
            vanilla, self.source_key, target, options, self.cache_dir, specs, verbose=self.verbose, verify=verify
        )
        if self.verbose:
            verb = "reusing compiled artifact" if self.artifact.reused else "compiled artifact written to"
            print(f"qgraph: {verb} {self.artifact.directory}", file=sys.stderr)
        return self.artifact.directory

    @property
    def onnx_path(self) -> Path | None:
        """The target-ready ONNX file of the last compile."""
        return self.artifact.onnx_path if self.artifact else None

    # -- generate -----------------------------------------------------------------------------------------------

    def _generation_defaults(self) -> dict[str, Any]:
        """What the model's generation_config sets, read without loading weights that are not loaded yet."""
        loaded = vars(self).get("model")
        config = getattr(loaded, "generation_config", None)
        return generation_config_defaults(config, getattr(self, "pretrained_path", None))

    def _requests(
        self, tokenizer, prompts, messages, options: dict[str, Any], start: float
    ) -> tuple[list[Request], list[str], list[str]]:
        """The requests of one call (checked before anything runs), the prompt texts to print, and notes."""
        if self.artifact is None:
            raise QGraphError("the model is not compiled: call model.compile(...) before model.generate(...)")
        if tokenizer is None:
            raise QGraphError("generate needs the tokenizer: generate(tokenizer, prompts) or tokenizer=...")
        resolved, notes = resolve_options(options, self._generation_defaults(), tokenizer.eos_token_id)
        if prompts is not None:  # checks of qgraph.validation: the prompts, then their ids against the vocabulary
            check_prompts(prompts)
        texts, prompt_ids = prompt_token_ids(tokenizer, prompts, messages)
        check_token_ids(prompt_ids, getattr(getattr(self.model, "config", None), "vocab_size", None))
        ctx_len = self.artifact.options.ctx_len
        requests = [
            Request(ids, resolved, ctx_len, tokenizer, index=i, submitted=start) for i, ids in enumerate(prompt_ids)
        ]
        notes += [r.capped_note for r in requests if r.capped_note]
        return requests, texts, notes

    def _loaded_session(self):
        if self._session is None:  # one-time session creation is not part of any request's latency
            self._session = self.artifact.load()
        return self._session

    def generate(
        self,
        tokenizer,
        prompts: str | Sequence[str] | None = None,
        generation_len: int | None = None,
        stream: bool = False,
        verbose: bool | None = None,
        *,
        messages: Sequence[Any] | None = None,
        **options: Any,
    ) -> GenerationResult:
        """Generate for each prompt (or chat conversation in ``messages``); prints texts and stats when ``verbose``.

        Decoding options use transformers' names: ``max_new_tokens`` (= ``generation_len``), ``do_sample``,
        ``temperature``, ``top_k``, ``top_p``, ``min_p``, ``repetition_penalty``, ``seed`` (each prompt draws from its
        own generator seeded with it), ``stop`` (strings; the text ends before one), ``eos_token_id``. Unset ones
        come from the model's generation_config, then transformers' defaults; greedy unless ``do_sample=True``.
        Safe to call from several threads: calls share one session and take turns.
        """
        verbose = self.verbose if verbose is None else verbose
        start = time.perf_counter()
        requests, texts, notes = self._requests(
            tokenizer, prompts, messages, options | {"generation_len": generation_len}, start
        )
        if self._full_batch_size:
            stats = self._run_on_engine(requests, texts[0] if stream else None, start)
        else:
            stats = self._run_static(requests, texts[0] if stream else None, tokenizer.pad_token_id or 0)
        result = GenerationResult(
            [r.generated for r in requests],
            [r.text for r in requests],
            stats,
            [len(r.prompt_ids) for r in requests],
            notes,
            [r.finish_reason for r in requests],
            [r.times.as_dict() for r in requests],
        )
        if verbose:
            for note in notes:
                print(f"qgraph: note: {note}", file=sys.stderr)
            for i, (prompt, text) in enumerate(zip(texts, result.generated_texts, strict=True)):
                if not (stream and i == 0):
                    print(f"{prompt}{text}")
            print(stats.format())
        return result

    def _run_static(self, requests: list[Request], stream_prompt: str | None, pad_token_id: int) -> LatencyStats:
        """Static batches of the compiled batch size, one call at a time; prints the first completion if asked."""
        stream = stream_prompt is not None
        with self._generate_lock:
            session = self._loaded_session()
            start = time.perf_counter()  # waiting for another thread's call is not this call's latency
            for r in requests:
                r.times.submitted = start
            if stream:
                print(stream_prompt, end="", flush=True)
            timer = StepTimer()
            steps = static_batch_steps(session, requests, self.artifact.options.batch_size, pad_token_id, timer)
            for taken in steps:
                if stream and any(r is requests[0] for r, _ in taken):
                    print(requests[0].tracker.increment(requests[0].done), end="", flush=True)
            stats = latency_stats(requests, timer, start, self.artifact.options.batch_size)
        if stream:
            print()
        return stats

    def _run_on_engine(self, requests: list[Request], stream_prompt: str | None, start: float) -> LatencyStats:
        """Every request through the continuous-batching engine; aggregate stats of this call.

        Prefill and decode times are the engine's during the call (other callers' requests included when several
        threads share the engine); device time is what the engine attributed to this call's requests."""
        engine = self.engine
        prefill_before, decode_before = engine.prefill_s, engine.decode_s
        handles = [engine.submit(r) for r in requests]
        if stream_prompt is not None:
            print(stream_prompt, end="", flush=True)
            for event in handles[0]:
                print(event.text, end="", flush=True)
            print()
        completions = [h.result() for h in handles]
        first = min((r.times.first_token for r in requests if r.times.first_token is not None), default=None)
        generated = sum(len(r.generated) for r in requests)
        return LatencyStats(
            ttft_s=(first - start) if first is not None else 0.0,
            prefill_s=engine.prefill_s - prefill_before,
            decode_s=engine.decode_s - decode_before,
            e2e_s=time.perf_counter() - start,
            device_s=sum(c.stats.device_s for c in completions),
            prompt_tokens=sum(len(r.prompt_ids) for r in requests),
            generated_tokens=generated,
            decode_tokens=generated - sum(1 for r in requests if r.generated),
            batch_size=engine.slots,
        )

    @property
    def _full_batch_size(self) -> int | None:
        return self.artifact.options.full_batch_size if self.artifact is not None else None

    @property
    def engine(self) -> Engine:
        """The continuous-batching engine of a model compiled with ``full_batch_size`` (created on first use)."""
        with self._generate_lock:
            if self._engine is None:
                if not self._full_batch_size:
                    raise QGraphError("continuous batching needs a model compiled with full_batch_size=N")
                self._engine = Engine(self._loaded_session(), self._full_batch_size)
            return self._engine

    def submit(
        self, tokenizer, prompt: str | None = None, *, messages: Sequence[Any] | None = None, **options: Any
    ) -> RequestHandle:
        """Queue one prompt (or conversation) on the engine, from any thread; returns its handle (iterate it for
        events, ``result()``, ``await`` it, ``cancel()``). A prompt that does not fit ``ctx_len`` is refused here."""
        self._check_single(prompt, messages)
        requests, _, notes = self._requests(tokenizer, prompt, messages, options, time.perf_counter())
        for note in notes:
            logger.info("note: %s", note)
        return self.engine.submit(requests[0])

    @staticmethod
    def _check_single(prompt: Any, messages: Any) -> None:
        if isinstance(prompt, list | tuple) or (messages and not isinstance(messages[0], Mapping)):
            raise QGraphError("stream and submit take one prompt or one conversation; call them once per prompt")

    def stream(
        self, tokenizer, prompt: str | None = None, *, messages: Sequence[Any] | None = None, **options: Any
    ) -> Iterator[StreamEvent]:
        """Iterate over one completion as it is generated: ``for event in model.stream(tokenizer, "Hi")``.

        Each event's ``.text`` is the new text since the last event (never a split character, never the start of a
        stop string that may still complete); joined they are the completion. The last event carries
        ``.finish_reason`` (``eos``, ``stop``, ``length``) and ``.stats``. Options as for ``generate``. The model's
        session is held until the iterator ends (or is closed): other ``generate`` calls wait for it.
        """
        self._check_single(prompt, messages)
        requests, _, notes = self._requests(tokenizer, prompt, messages, options, time.perf_counter())
        for note in notes:
            logger.info("note: %s", note)
        if self._full_batch_size:
            return iter(self.engine.submit(requests[0]))
        return self._stream_static(requests[0], tokenizer.pad_token_id or 0)

    def _stream_static(self, request: Request, pad_token_id: int) -> Iterator[StreamEvent]:
        with self._generate_lock:
            session = self._loaded_session()
            request.times.submitted = start = time.perf_counter()
            timer = StepTimer()
            with contextlib.closing(
                static_batch_steps(session, [request], self.artifact.options.batch_size, pad_token_id, timer)
            ) as steps:
                for taken in steps:
                    for _, token in taken:
                        if request.done:
                            break
                        yield StreamEvent(request.tracker.increment(), [token])
            stats = latency_stats([request], timer, start, self.artifact.options.batch_size)
        yield StreamEvent(
            request.tracker.increment(finished=True), [request.generated[-1]], request.finish_reason, stats
        )

"""``QEFFAutoModelForCausalLM``: the QEfficient-compatible front door (from_pretrained -> compile -> generate)."""

from __future__ import annotations

import contextlib
import copy
import functools
import gc
import logging
import os
import threading
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from importlib.metadata import version
from pathlib import Path
from typing import Any

from qgraph import __version__
from qgraph.backend_api import CompileOptions
from qgraph.cache import cache_root, digest, publish, reuse, tensor_digest
from qgraph.checkpoint import (
    Checkpoint,
    FileDigests,
    expand_path,
    hub_failure_hint,
    looks_like_path,
    resolve_checkpoint,
)
from qgraph.compiler import ONNX_FILE, CompiledArtifact, compile_onnx, default_pipeline, get_backend, unused_options
from qgraph.decoding import generation_config_defaults, resolve_options
from qgraph.engine import Engine, RequestHandle
from qgraph.errors import ModelNotFoundError, QGraphError
from qgraph.pipeline_spec import PassSpec, parse_pipeline
from qgraph.progress import note, show, step
from qgraph.prompts import prompt_token_ids
from qgraph.proposers import DraftModel, PromptLookup, Proposer
from qgraph.registry import pass_registry
from qgraph.request import Request
from qgraph.runtime import GenerationResult, StepTimer, StreamEvent, latency_stats, static_batch_steps
from qgraph.speculative import check_speculation, speculative_batch_steps
from qgraph.stats import LatencyStats
from qgraph.validation import check_pipeline, check_prompts, check_token_ids

EXPORT_OPSET = 20
EXPORT_DTYPES = ("float32", "float16", "bfloat16")
# from_pretrained arguments that say where or how to fetch a checkpoint, not what model it is.
NON_SHAPING_HF_KWARGS = frozenset({"token", "cache_dir", "local_files_only", "force_download", "proxies"})
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


def load_hf_model(name_or_path: str | os.PathLike, **hf_kwargs: Any):
    """``AutoModelForCausalLM.from_pretrained`` with eager attention (the graph form the passes read)."""
    from transformers import AutoModelForCausalLM

    hf_kwargs.setdefault("attn_implementation", "eager")
    name = os.fspath(name_or_path)
    if looks_like_path(name):
        if not expand_path(name).exists():
            raise ModelNotFoundError(f"model path {name!r} does not exist")
        name = str(expand_path(name))
    try:
        model = AutoModelForCausalLM.from_pretrained(name, **hf_kwargs)
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(f"could not load model {name!r} ({hub_failure_hint()}): {exc}") from exc
    return model.eval()


def resolve_export_dtype(requested: Any, stored: str | None) -> str:
    """The dtype the graph is exported in: float32 unless the user asks otherwise (``"auto"`` keeps the stored one).

    Hub checkpoints are mostly bfloat16, for which ONNX Runtime's CPU provider lacks kernels; an upcast export runs
    everywhere, and the backends' ``precision`` then chooses float16 / int8 / int4 from exact float32 weights.
    """
    if requested is None:
        return "float32"
    name = str(requested).removeprefix("torch.")
    if name == "auto":
        name = stored or "float32"
    if name not in EXPORT_DTYPES:
        raise QGraphError(
            f"dtype {requested!r} is not an export dtype; use one of {', '.join(EXPORT_DTYPES)} or 'auto'"
        )
    return name


def _library_versions() -> dict[str, str]:
    """Versions that shape an export, read from package metadata (importing torch for its version costs ~250 MB)."""
    return {name: version(name) for name in ("torch", "transformers", "onnxscript")} | {"qgraph": __version__}


class QEFFAutoModelForCausalLM:
    """A HuggingFace causal LM on its way to a backend: export, compile, generate.

    >>> model = QEFFAutoModelForCausalLM.from_pretrained("gpt2")
    >>> model.compile(num_cores=16)
    >>> model.generate(prompts=["Hi there!!"], tokenizer=tokenizer)

    Made from a checkpoint (``from_pretrained``), the PyTorch model is read only when an export is needed and
    released after it; ``.model`` loads it again on demand. Made from a model object, that object is used as is.
    """

    def __init__(
        self,
        model=None,
        cache_dir: str | os.PathLike | None = None,
        verbose: bool = True,
        *,
        checkpoint: Checkpoint | None = None,
        hf_kwargs: dict[str, Any] | None = None,
        dtype: Any = None,
    ):
        if (model is None) == (checkpoint is None):
            raise QGraphError(
                "give either a PyTorch model or a checkpoint (use QEFFAutoModelForCausalLM.from_pretrained)"
            )
        self._model = model
        self._model_handed_out = model is not None
        self._checkpoint = checkpoint
        self._hf_kwargs = dict(hf_kwargs or {})
        self.cache_dir = cache_root(cache_dir)
        self.verbose = verbose
        stored = checkpoint.stored_dtype() if checkpoint else str(next(model.parameters()).dtype).removeprefix("torch.")
        self.stored_dtype = stored
        self.export_dtype = resolve_export_dtype(dtype, stored)
        self._source_key: str | None = None
        self.artifact: CompiledArtifact | None = None
        self._session = None
        self._generate_lock = threading.Lock()  # one session, one set of KV buffers: generate calls take turns
        self._engine: Engine | None = None

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *,
        cache_dir: str | os.PathLike | None = None,
        verbose: bool = True,
        dtype: Any = None,
        **hf_kwargs: Any,
    ) -> QEFFAutoModelForCausalLM:
        """Read the checkpoint's config and weight-file index (same arguments as transformers' ``from_pretrained``).

        No weights are loaded here: the model is materialised only if its export is not cached. ``dtype`` is the
        export dtype (float32 by default, whatever the checkpoint stores; ``"auto"`` keeps the stored dtype).
        """
        if dtype is None:
            dtype = hf_kwargs.pop("torch_dtype", None)  # transformers' older name for the same argument
        checkpoint = resolve_checkpoint(pretrained_model_name_or_path, hf_kwargs)
        return cls(cache_dir=cache_dir, verbose=verbose, checkpoint=checkpoint, hf_kwargs=hf_kwargs, dtype=dtype)

    def _note(self, message: str) -> None:
        if self.verbose:
            note(f"note: {message}")

    # -- the PyTorch model, on demand ---------------------------------------------------------------------------

    @property
    def model(self):
        """The PyTorch model (QEfficient exposes it as ``.model`` too), loaded from the checkpoint on first use.

        Once handed out it may be edited, so from then on the export is keyed by its tensors, not the files.
        """
        self._model_handed_out = True
        return self._materialised_model()

    def _materialised_model(self):
        if self._model is None:
            import torch

            size = f"{self._checkpoint.weight_bytes / 1e9:.2f} GB"
            with step(f"loading {self.architecture} weights ({size})", self.verbose):
                self._model = load_hf_model(
                    self._checkpoint.directory, dtype=getattr(torch, self.export_dtype), **self._hf_kwargs
                )
        return self._model

    def reference_model(self):
        """HF transformers' float32 model of the same weights, the reference a compiled model is compared with
        (``qgraph.evaluation``): loaded fresh from the checkpoint and not kept, or the model object given."""
        if self._checkpoint is None or self._model is not None:
            return self._materialised_model()
        import torch

        return load_hf_model(self._checkpoint.directory, dtype=torch.float32, **self._hf_kwargs)

    @property
    def checkpoint_directory(self) -> Path | None:
        """The local directory of the checkpoint (its config, weights and tokenizer); None for a model object."""
        return self._checkpoint.directory if self._checkpoint else None

    @property
    def model_loaded(self) -> bool:
        """Whether the PyTorch model is in memory (a cached artifact never needs it)."""
        return self._model is not None

    @property
    def architecture(self) -> str:
        return self._checkpoint.architecture if self._checkpoint else type(self._model).__name__

    @property
    def vocab_size(self) -> int | None:
        """The vocabulary size the config declares (read from config.json when the weights are not loaded)."""
        if self._model is not None or self._checkpoint is None or not self._checkpoint.config:
            return getattr(self._materialised_model().config.get_text_config(), "vocab_size", None)
        config = self._checkpoint.config
        return config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")

    @property
    def generation_config(self):
        """The model's ``GenerationConfig`` (EOS ids, sampling defaults), read without loading the weights."""
        from transformers import GenerationConfig

        if self._checkpoint is None or not self._checkpoint.config:
            return self._materialised_model().generation_config
        directory = self._checkpoint.directory
        if (directory / "generation_config.json").is_file():
            return GenerationConfig.from_pretrained(directory)
        ids = ("bos_token_id", "eos_token_id", "pad_token_id")
        return GenerationConfig(**{k: self._checkpoint.config[k] for k in ids if k in self._checkpoint.config})

    # -- export -------------------------------------------------------------------------------------------------

    @property
    def source_key(self) -> str:
        """Digest of everything that shapes the vanilla export: class, config, weights, dtype, attention, versions.

        From a checkpoint the weights count by their files' content digests (hashed once, remembered by path, size
        and mtime), so finding a cached artifact reads no tensor.
        """
        if self._source_key is None or self._model_handed_out:
            shaping: dict[str, Any] = {"dtype": self.export_dtype, "opset": EXPORT_OPSET, **_library_versions()}
            if not self._model_handed_out:
                hf_kwargs = {k: v for k, v in self._hf_kwargs.items() if k not in NON_SHAPING_HF_KWARGS}
                stage = functools.partial(step, enabled=self.verbose)
                weights = FileDigests(self.cache_dir).of(self._checkpoint.weight_files, stage=stage)
                shaping |= {
                    "class": self.architecture,
                    "config": self._checkpoint.config,
                    "weight_files": weights,
                    "attn_implementation": hf_kwargs.pop("attn_implementation", "eager"),
                    "hf_kwargs": hf_kwargs,
                }
            else:
                model = self._model
                shaping |= {
                    "class": type(model).__name__,
                    "config": model.config.to_dict(),
                    "weights": tensor_digest(model.state_dict().items()),
                    "attn_implementation": getattr(model.config, "_attn_implementation", None),
                }
            self._source_key = digest(shaping)
        return self._source_key

    def _model_for_export(self):
        """The PyTorch model in the export dtype (a converted copy when a given model object is in another dtype)."""
        import torch

        model = self._materialised_model()
        wanted = getattr(torch, self.export_dtype)
        if next(model.parameters()).dtype == wanted:
            return model
        return copy.deepcopy(model).to(wanted)

    def export(self, verify: bool = False) -> Path:
        """The vanilla ONNX export (cached; a damaged entry is rebuilt, ``verify`` re-hashes it); returns its path.

        A model loaded for the export is released afterwards."""
        return self._export(self.source_key, verify)

    def _export(self, source_key: str, verify: bool) -> Path:
        """``export`` under a key already computed (a handed-out model's key hashes every tensor: once a compile)."""
        directory = self.cache_dir / "exports" / f"{self.architecture}-{source_key}"
        if not reuse(directory, verify):
            import onnx_ir as ir

            from qgraph.export import export_vanilla

            if self.stored_dtype and self.stored_dtype != self.export_dtype:
                self._note(
                    f"weights are stored as {self.stored_dtype}; exporting in {self.export_dtype} (dtype= to choose)"
                )
            loaded_here = self._model is None
            model = self._model_for_export()
            params = sum(p.numel() for p in model.parameters()) / 1e6
            try:
                with (
                    step(
                        f"exporting {self.architecture} ({params:.1f}M parameters, {self.export_dtype})", self.verbose
                    ),
                    _exporter_chatter_silenced(),
                ):
                    exported = export_vanilla(model, opset=EXPORT_OPSET)
                    with publish(directory) as tmp:
                        ir.save(exported, tmp / ONNX_FILE, external_data=ONNX_FILE + ".data")
            finally:
                del model
                exported = None
                if loaded_here and not self._model_handed_out:
                    self._model = None  # the export holds everything later steps need; free the weights
                gc.collect()
        return directory / ONNX_FILE

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
        num_speculative_tokens: int | None = None,
        quantization: dict[str, Any] | None = None,
        **backend_options: Any,
    ) -> Path:
        """Export (if needed), run the backend's passes and compile; returns the artifact directory.

        Options a backend does not act on (e.g. ``num_cores`` on ONNX Runtime) are accepted and listed in a note.
        ``full_batch_size=N`` (QEfficient's name) compiles for continuous batching: ``generate`` and ``submit`` then
        run requests through an engine of N KV slots (``model.engine``). ``num_speculative_tokens=k`` (QEfficient's
        name) lets a run verify ``k`` guessed tokens per row: ``generate(..., prompt_lookup_num_tokens=k)`` or
        ``generate(..., assistant_model=draft)`` then decode speculatively (same greedy tokens, fewer runs).
        ``quantization`` overrides options of the ``quantize-weights`` pass that ``precision="int8"|"int4"`` runs
        (``qgraph.pipelines.QUANTIZATION_DEFAULTS``; the README's sweep table shows what each costs), e.g.
        ``{"head_bits": 4, "symmetric": True, "block_size": 64}``.
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
            num_speculative_tokens=num_speculative_tokens,
            quantization=quantization,
        )
        explicit = ({"num_cores": num_cores} if num_cores is not None else {}) | backend_options
        ignored = unused_options(target, explicit)
        if ignored and self.verbose:
            note(f"note: backend {backend!r} does not use {', '.join(ignored)} (ignored)")
        # before the export, everything that can be checked is: a request the target refuses fails at once
        check_backend_options = getattr(target, "check_options", None)
        if check_backend_options is not None:
            check_backend_options(options)
        specs = default_pipeline(target, options, self.cache_dir)
        if passes is not None:
            given = parse_pipeline(passes) if isinstance(passes, str) else [PassSpec(p) for p in passes]
            specs = check_pipeline(given, specs, options.ctx_len, pass_registry())
        source_key = self.source_key
        self.artifact = compile_onnx(
            lambda: self._export(source_key, verify),  # only when the compiled artifact is not cached
            source_key,
            target,
            options,
            self.cache_dir,
            specs,
            verbose=self.verbose,
            verify=verify,
        )
        if self.verbose:
            verb = "reusing compiled artifact" if self.artifact.reused else "compiled artifact written to"
            note(f"{verb} {self.artifact.directory}")
        return self.artifact.directory

    @property
    def onnx_path(self) -> Path | None:
        """The target-ready ONNX file of the last compile."""
        return self.artifact.onnx_path if self.artifact else None

    # -- generate -----------------------------------------------------------------------------------------------

    def _generation_defaults(self) -> dict[str, Any]:
        """What the model's generation_config sets, read without loading weights that are not loaded yet."""
        if self._model is not None or self._checkpoint is None:
            return generation_config_defaults(self._materialised_model().generation_config)
        return generation_config_defaults(None, self._checkpoint.directory)

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
        check_token_ids(prompt_ids, self.vocab_size)
        self._check_speculation(resolved)
        ctx_len = self.artifact.options.ctx_len
        requests = [
            Request(ids, resolved, ctx_len, tokenizer, index=i, submitted=start) for i, ids in enumerate(prompt_ids)
        ]
        notes += [r.capped_note for r in requests if r.capped_note]
        return requests, texts, notes

    def _check_speculation(self, options) -> None:
        """Refuse speculative decoding this compile cannot verify, before anything runs."""
        if not options.speculative:
            return
        if options.assistant_model is self:
            raise QGraphError(
                "assistant_model is this model itself; give another QEFFAutoModelForCausalLM (e.g. the same "
                "checkpoint loaded again and compiled with precision='int4')"
            )
        compiled = self.artifact.options.num_speculative_tokens
        k = options.prompt_lookup_num_tokens or options.num_assistant_tokens or compiled
        asked = (
            f"prompt_lookup_num_tokens={k}"
            if options.prompt_lookup_num_tokens
            else f"assistant_model with num_assistant_tokens={k}"
            if options.num_assistant_tokens
            else "assistant_model"
        )
        if k is None or not compiled or k > compiled:
            raise QGraphError(
                f"{asked} needs a model compiled with num_speculative_tokens >= {k or 'the guesses per step'}, but "
                f"this one was compiled {'without it' if not compiled else f'with num_speculative_tokens={compiled}'}"
                f": call model.compile(..., num_speculative_tokens={k or 4})"
            )

    def _proposer(self, session, options) -> tuple[Proposer, int]:
        """The proposer a call asks for and the guesses per verification it may make."""
        if options.prompt_lookup_num_tokens is not None:
            k = options.prompt_lookup_num_tokens
            check_speculation(session, k, f"prompt_lookup_num_tokens={k}")
            return PromptLookup(k), k
        k = options.num_assistant_tokens or self.artifact.options.num_speculative_tokens
        check_speculation(session, k, f"assistant_model with {k} guesses per step")
        return DraftModel(options.assistant_model, k), k

    def _steps(
        self, session, requests: list[Request], pad_token_id: int, timer: StepTimer
    ) -> Iterator[list[tuple[Request, int]]]:
        """The decode steps of a static-batch call: plain, or speculative when the call asks for a proposer."""
        batch_size = self.artifact.options.batch_size
        options = requests[0].options
        if not options.speculative:
            yield from static_batch_steps(session, requests, batch_size, pad_token_id, timer)
            return
        proposer, k = self._proposer(session, options)
        with proposer.in_use() if isinstance(proposer, DraftModel) else contextlib.nullcontext():
            yield from speculative_batch_steps(session, requests, batch_size, pad_token_id, timer, proposer, k)

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
            for text in notes:
                note(f"note: {text}")
            for i, (prompt, text) in enumerate(zip(texts, result.generated_texts, strict=True)):
                if not (stream and i == 0):
                    show(f"{prompt}{text}")
            show(stats.format())
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
                show(stream_prompt, end="")
            timer = StepTimer()
            for taken in self._steps(session, requests, pad_token_id, timer):
                if stream and any(r is requests[0] for r, _ in taken):
                    show(requests[0].tracker.increment(requests[0].done), end="")
            stats = latency_stats(requests, timer, start, self.artifact.options.batch_size)
        if stream:
            show()
        return stats

    def _run_on_engine(self, requests: list[Request], stream_prompt: str | None, start: float) -> LatencyStats:
        """Every request through the continuous-batching engine; aggregate stats of this call.

        Prefill and decode times are the engine's during the call (other callers' requests included when several
        threads share the engine); device time is what the engine attributed to this call's requests."""
        engine = self.engine
        prefill_before, decode_before = engine.prefill_s, engine.decode_s
        handles = [engine.submit(r) for r in requests]
        if stream_prompt is not None:
            show(stream_prompt, end="")
            for event in handles[0]:
                show(event.text, end="")
            show()
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
            proposed_tokens=sum(r.speculation.proposed for r in requests),
            accepted_tokens=sum(r.speculation.accepted for r in requests),
            verify_runs=sum(r.speculation.verified_rows for r in requests),
            verified_rows=sum(r.speculation.verified_rows for r in requests),
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
        for text in notes:
            logger.info("note: %s", text)
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
        for text in notes:
            logger.info("note: %s", text)
        if self._full_batch_size:
            return iter(self.engine.submit(requests[0]))
        return self._stream_static(requests[0], tokenizer.pad_token_id or 0)

    def _stream_static(self, request: Request, pad_token_id: int) -> Iterator[StreamEvent]:
        with self._generate_lock:
            session = self._loaded_session()
            request.times.submitted = start = time.perf_counter()
            timer = StepTimer()
            last_tokens = []
            with contextlib.closing(self._steps(session, [request], pad_token_id, timer)) as steps:
                for taken in steps:
                    last_tokens = [token for _, token in taken]  # one step may take several (speculative)
                    if request.done:
                        break
                    yield StreamEvent(request.tracker.increment(), last_tokens)
            stats = latency_stats([request], timer, start, self.artifact.options.batch_size)
        yield StreamEvent(request.tracker.increment(finished=True), last_tokens, request.finish_reason, stats)

"""``QEFFAutoModelForCausalLM``: the QEfficient-compatible front door (from_pretrained -> compile -> generate)."""

from __future__ import annotations

import contextlib
import copy
import gc
import logging
import os
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from importlib.metadata import version
from pathlib import Path
from typing import Any

from qgraph import __version__
from qgraph.backend_api import CompileOptions
from qgraph.cache import DEFAULT_CACHE_DIR, digest, is_complete, publish, tensor_digest
from qgraph.checkpoint import Checkpoint, FileDigests, expand_path, looks_like_path, resolve_checkpoint
from qgraph.compiler import ONNX_FILE, CompiledArtifact, compile_onnx, get_backend, unused_options
from qgraph.errors import ModelNotFoundError, QGraphError
from qgraph.pass_manager import PassSpec, parse_pipeline
from qgraph.progress import step
from qgraph.runtime import GenerationResult, TextStreamer, greedy_generate

EXPORT_OPSET = 20
EXPORT_DTYPES = ("float32", "float16", "bfloat16")
# from_pretrained arguments that say where or how to fetch a checkpoint, not what model it is.
NON_SHAPING_HF_KWARGS = frozenset({"token", "cache_dir", "local_files_only", "force_download", "proxies"})


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
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        hint = (
            " (HF_HUB_OFFLINE is set, so only the local cache is searched)"
            if offline
            else " (not a local directory; the HuggingFace hub could not provide it)"
        )
        raise ModelNotFoundError(f"could not load model {name!r}{hint}: {exc}") from exc
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
        self.cache_dir = expand_path(cache_dir) if cache_dir else DEFAULT_CACHE_DIR
        self.verbose = verbose
        stored = checkpoint.stored_dtype() if checkpoint else str(next(model.parameters()).dtype).removeprefix("torch.")
        self.export_dtype = resolve_export_dtype(dtype, stored)
        self._source_key: str | None = None
        self._vanilla_path: Path | None = None
        self.artifact: CompiledArtifact | None = None
        self._session = None
        if stored and stored != self.export_dtype:
            self._note(f"weights are stored as {stored}; exporting in {self.export_dtype} (dtype= to choose)")

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

    def _progress(self, message: str) -> None:
        if self.verbose:
            print(f"qgraph: {message} (once) ...", file=sys.stderr, flush=True)

    def _note(self, message: str) -> None:
        if self.verbose:
            print(f"qgraph: note: {message}", file=sys.stderr)

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

    @property
    def model_loaded(self) -> bool:
        """Whether the PyTorch model is in memory (a cached artifact never needs it)."""
        return self._model is not None

    @property
    def architecture(self) -> str:
        return self._checkpoint.architecture if self._checkpoint else type(self._model).__name__

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
                weights = FileDigests(self.cache_dir).of(self._checkpoint.weight_files, progress=self._progress)
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

    def export(self) -> Path:
        """The vanilla ONNX export (cached); returns its path. A model loaded for it is released afterwards."""
        if self._vanilla_path is not None:
            return self._vanilla_path
        directory = self.cache_dir / "exports" / f"{self.architecture}-{self.source_key}"
        if not is_complete(directory):
            import onnx_ir as ir

            from qgraph.export import export_vanilla

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
        **backend_options: Any,
    ) -> Path:
        """Export (if needed), run the backend's passes and compile; returns the artifact directory.

        Options a backend does not act on (e.g. ``num_cores`` on ONNX Runtime) are accepted and listed in a note.
        """
        target = get_backend(backend)
        options = CompileOptions(
            prefill_seq_len=prefill_seq_len,
            ctx_len=ctx_len,
            batch_size=batch_size,
            num_cores=16 if num_cores is None else num_cores,
            precision=precision,
            extra=backend_options,
        )
        explicit = ({"num_cores": num_cores} if num_cores is not None else {}) | backend_options
        ignored = unused_options(target, explicit)
        if ignored and self.verbose:
            print(f"qgraph: note: backend {backend!r} does not use {', '.join(ignored)} (ignored)", file=sys.stderr)
        if passes is not None:
            specs = parse_pipeline(passes) if isinstance(passes, str) else [PassSpec(p) for p in passes]
        else:
            specs = target.pipeline(options)  # before the export: a request the target refuses fails at once
        vanilla = self.export()
        self.artifact = compile_onnx(
            vanilla, self.source_key, target, options, self.cache_dir, specs, verbose=self.verbose
        )
        if self.verbose:
            verb = "reusing compiled artifact" if self.artifact.reused else "compiled artifact written to"
            print(f"qgraph: {verb} {self.artifact.directory}", file=sys.stderr)
        self._session = None
        return self.artifact.directory

    @property
    def onnx_path(self) -> Path | None:
        """The target-ready ONNX file of the last compile."""
        return self.artifact.onnx_path if self.artifact else None

    # -- generate -----------------------------------------------------------------------------------------------

    def _eos_token_ids(self, tokenizer) -> set[int]:
        eos = self.generation_config.eos_token_id
        if eos is None:
            eos = tokenizer.eos_token_id
        if eos is None:
            return set()
        return {int(e) for e in (eos if isinstance(eos, list | tuple) else [eos])}

    def generate(
        self,
        tokenizer,
        prompts: str | Sequence[str],
        generation_len: int | None = None,
        stream: bool = False,
        verbose: bool | None = None,
        **_: Any,
    ) -> GenerationResult:
        """Greedy generation for each prompt; prints the texts and latency stats when ``verbose``."""
        verbose = self.verbose if verbose is None else verbose
        if self.artifact is None:
            raise QGraphError("the model is not compiled: call model.compile(...) before model.generate(...)")
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise QGraphError("no prompts given")
        if self._session is None:  # one-time session creation is not part of any request's latency
            self._session = self.artifact.load()
        start = time.perf_counter()
        prompt_ids = [list(tokenizer(p)["input_ids"]) for p in prompts]
        streamer = TextStreamer(tokenizer) if stream else None
        if streamer:
            print(prompts[0], end="", flush=True)
        outputs, stats, notes = greedy_generate(
            self._session,
            prompt_ids,
            batch_size=self.artifact.options.batch_size,
            generation_len=generation_len,
            eos_token_ids=self._eos_token_ids(tokenizer),
            pad_token_id=tokenizer.pad_token_id or 0,
            on_token=streamer,
            start_time=start,
        )
        if streamer:
            streamer.end()
        texts = [tokenizer.decode(o, skip_special_tokens=True) for o in outputs]
        if verbose:
            for note in notes:
                print(f"qgraph: note: {note}", file=sys.stderr)
            for i, (prompt, text) in enumerate(zip(prompts, texts, strict=True)):
                if not (stream and i == 0):
                    print(f"{prompt}{text}")
            print(stats.format())
        return GenerationResult(outputs, texts, stats, [len(p) for p in prompt_ids], notes)

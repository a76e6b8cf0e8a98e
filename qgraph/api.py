"""``QEFFAutoModelForCausalLM``: the QEfficient-compatible front door (from_pretrained -> compile -> generate)."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from qgraph import __version__
from qgraph.backend_api import CompileOptions
from qgraph.cache import cache_root, digest, publish, reuse, tensor_digest
from qgraph.compiler import ONNX_FILE, CompiledArtifact, compile_onnx, get_backend, unused_options
from qgraph.errors import ModelNotFoundError, QGraphError
from qgraph.pass_manager import PassSpec, parse_pipeline
from qgraph.progress import step
from qgraph.runtime import GenerationResult, TextStreamer, greedy_generate

EXPORT_OPSET = 20


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
        **backend_options: Any,
    ) -> Path:
        """Export (if needed), run the backend's passes and compile; returns the artifact directory.

        Options a backend does not act on (e.g. ``num_cores`` on ONNX Runtime) are accepted and listed in a note.
        ``verify`` re-hashes every cached file reused instead of trusting unchanged sizes and mtimes. A compile that
        fails leaves the model uncompiled (never holding the previous artifact unannounced).
        """
        self.artifact, self._session = None, None
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
        vanilla = self.export(verify)
        self.artifact = compile_onnx(
            vanilla, self.source_key, target, options, self.cache_dir, specs, verbose=self.verbose, verify=verify
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
        eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
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

"""Vanilla ONNX -> backend pipeline -> compiled artifact, cached by a key of everything that shaped it."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qgraph.backend_api import Backend, CompileOptions, DecoderSession
from qgraph.cache import CacheError, code_digest, digest, entry_problem, publish, reuse
from qgraph.pipeline_spec import PassSpec
from qgraph.progress import note, show, step
from qgraph.registry import Registry, backend_registry, pass_registry

ONNX_FILE = "model.onnx"  # every backend writes its target-ready graph under this name in the artifact
REPORT_FILE = "passes.json"
CORE_OPTIONS = frozenset({"prefill_seq_len", "ctx_len", "batch_size", "precision"})


@dataclass
class CompiledArtifact:
    backend: Backend
    options: CompileOptions
    directory: Path
    reports: list[dict[str, Any]] = field(default_factory=list)
    reused: bool = False

    @property
    def onnx_path(self) -> Path:
        return self.directory / ONNX_FILE

    def load(self) -> DecoderSession:
        """A session over the artifact, once its files are checked to be as published (they may have changed since
        ``compile``: a raw ORT or JSON error would not say so)."""
        problem = entry_problem(self.directory)
        if problem is not None:
            raise CacheError(
                f"the compiled artifact {self.directory} changed after compile ({problem}): call compile(...) again "
                "to rebuild it"
            )
        return self.backend.load(self.directory, self.options)


def get_backend(name: str, registry: Registry | None = None) -> Backend:
    return (registry or backend_registry()).get(name)()


def unused_options(backend: Backend, given: dict[str, Any]) -> list[str]:
    """Options the caller set that this backend does not act on (accepted, reported, ignored)."""
    return sorted(k for k in given if k not in CORE_OPTIONS and k not in backend.used_options)


def default_pipeline(backend: Backend, options: CompileOptions, cache_dir: Path) -> list[PassSpec]:
    """``backend.pipeline(options)``, remembered under ``cache_dir/pipelines``.

    Deriving a pipeline asks every pass what it writes, which imports them all (onnx_ir, onnxscript: ~60 MB); a
    process that only reuses a compiled artifact needs the pipeline's names and options, not the passes. The memo is
    keyed by the backend, its capabilities, the options, and the source of the backend and of every registered pass.
    """
    registry = pass_registry()
    key = digest(
        {
            "backend": backend.name,
            "capabilities": backend.capabilities.as_dict(),
            "options": options.key(),
            "passes": registry.names(),
            "code": code_digest([type(backend).__module__, *(registry.module_of(n) for n in registry.names())]),
        }
    )
    memo = cache_dir / "pipelines" / f"{backend.name}-{key}.json"
    try:
        return [PassSpec(s["name"], s["options"]) for s in json.loads(memo.read_text())]
    except (OSError, ValueError, KeyError, TypeError):
        pass  # not remembered yet (or unreadable): derive it
    specs = backend.pipeline(options)
    try:
        text = json.dumps([{"name": s.name, "options": dict(s.options)} for s in specs])
    except TypeError:
        return specs  # an option that is an object (a target's own lowering): not remembered, derived each time
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_name(f".{memo.name}.{os.getpid()}")
        tmp.write_text(text)
        os.replace(tmp, memo)
    except OSError:
        pass  # a read-only cache: derived again next time
    return specs


def artifact_key(
    source_key: str, backend: Backend, specs: list[PassSpec], options: CompileOptions, registry: Registry | None = None
) -> str:
    """Digest of the source model, the backend and its code, the passes with their options and code, the options."""
    registry = registry or pass_registry()
    used_extra = {k: v for k, v in options.extra.items() if k in backend.used_options}
    shaping = options.key() | {"extra": used_extra}
    if "num_cores" not in backend.used_options:
        shaping.pop("num_cores")
    return digest(
        {
            "source": source_key,
            "backend": backend.name,
            "backend_version": getattr(backend, "version", ""),
            "capabilities": backend.capabilities.as_dict(),
            "passes": [s.key() for s in specs],
            "code": code_digest([type(backend).__module__, *(registry.module_of(s.name) for s in specs)]),
            "options": shaping,
        }
    )


def compile_onnx(
    vanilla_path: Path | Callable[[], Path],
    source_key: str,
    backend: Backend,
    options: CompileOptions,
    cache_dir: Path,
    passes: list[PassSpec] | None = None,
    pass_reg: Registry | None = None,
    verbose: bool = True,
    verify: bool = False,
) -> CompiledArtifact:
    """Run the backend's pipeline (or ``passes``) over the vanilla graph and let the backend compile the result.

    A cached artifact is reused only when its files are as published (``verify``: re-hash them all); a damaged one
    is rebuilt. ``vanilla_path`` may be a function that exports on demand: a reused artifact needs no export, and
    finding it imports no graph library.
    """
    specs = passes if passes is not None else backend.pipeline(options)
    registry = pass_reg or pass_registry()
    key = artifact_key(source_key, backend, specs, options, registry)
    directory = cache_dir / "compiled" / f"{backend.name}-{key}"
    if reuse(directory, verify):
        reports = json.loads((directory / REPORT_FILE).read_text())
        return CompiledArtifact(backend, options, directory, reports, reused=True)
    import onnx_ir as ir

    from qgraph.pass_manager import format_reports, run_pipeline

    if callable(vanilla_path):
        vanilla_path = vanilla_path()
    with step(f"compiling for backend {backend.name!r} ({len(specs)} passes)", verbose):
        model = ir.load(vanilla_path)
        reports = run_pipeline(
            model, specs, registry, progress=(lambda m: note(f"  {m}")) if verbose else None
        )
        if verbose:
            show(format_reports(reports), stream=sys.stderr)
        with publish(directory) as tmp:
            backend.compile(model, options, tmp)
            (tmp / REPORT_FILE).write_text(json.dumps([r.as_dict() for r in reports], indent=2))
    return CompiledArtifact(backend, options, directory, [r.as_dict() for r in reports])

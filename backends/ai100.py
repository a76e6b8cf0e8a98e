"""Qualcomm Cloud AI 100 backend: the compile bundle, the SDK's compiler where it exists, the SDK runtime to run it.

``compile`` always writes the bundle (``ai100_bundle``): the retained-state graph with ``CustomRMSNorm``
(``ai100_rmsnorm``, offered to the pipeline as a lowering) and fp16-safe constants (the card computes in float16),
``specializations.json``, ``custom_io.yaml``, an MDP partition file for several cards and ``compile.sh``, the exact
``qaic-exec`` command. Where the SDK's compiler is installed (its standard path, or the ``compiler`` option) the
command is run and the bundle also holds the compiled program; where it is not, the bundle says how to finish on a
machine with the card. ``load`` runs the program through the SDK runtime (``ai100_session``), or explains what is
missing.

The core caches the bundle under a key of everything that shaped it: the source model, the passes, the options this
backend uses, and ``version`` (the bundle format and which compiler, if any, this machine has).
"""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path
from typing import ClassVar

import onnx_ir as ir

from qgraph.backend_api import Capabilities, CompileOptions, Kernel
from qgraph.backends.ai100_bundle import (
    BUNDLE_FORMAT,
    BUNDLE_OPTIONS,
    PROGRAM_FILE,
    QPC_DIR,
    SCRIPT_FILE,
    BundleSettings,
    finish_instructions,
    read_manifest,
    write_bundle,
    write_manifest,
)
from qgraph.backends.ai100_rmsnorm import CUSTOM_RMSNORM
from qgraph.errors import BackendUnavailableError, QGraphError
from qgraph.pass_manager import PassSpec
from qgraph.pipelines import standard_pipeline
from qgraph.progress import step

log = logging.getLogger(__name__)

# Where the SDK installs its compiler; newer SDKs ship qaic-compile beside or instead of qaic-exec.
STANDARD_COMPILERS = (Path("/opt/qti-aic/exec/qaic-exec"), Path("/opt/qti-aic/exec/qaic-compile"))


def find_compiler(explicit: str | os.PathLike | None = None) -> Path | None:
    """The compiler to run: ``explicit`` (which must exist), else the first standard path present, else None."""
    if explicit:
        path = Path(explicit).expanduser()
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise QGraphError(f"ai100 option compiler={explicit!s}: no executable file there")
        return path
    return next((p for p in STANDARD_COMPILERS if p.is_file() and os.access(p, os.X_OK)), None)


def compiler_identity(path: Path | None) -> str:
    """Which compiler a bundle was made with (or "none"): part of the cache key, so installing the SDK recompiles."""
    if path is None:
        return "none"
    stat = path.stat()
    return f"{path}:{stat.st_size}:{stat.st_mtime_ns}"


def device_ids(options: CompileOptions, settings: BundleSettings) -> list[int]:
    """The cards to run on: ``device_ids`` if given (one per ``num_devices``), else ``0..num_devices-1``."""
    given = options.extra.get("device_ids")
    if given is None:
        return list(range(settings.num_devices))
    if not isinstance(given, list | tuple) or not all(isinstance(d, int) and d >= 0 for d in given):
        raise QGraphError(f"ai100 option device_ids must be a list of card numbers, got {given!r}")
    if len(given) != settings.num_devices:
        raise QGraphError(
            f"ai100 option device_ids lists {len(given)} card(s) but num_devices is {settings.num_devices}: "
            f"set num_devices={len(given)}"
        )
    return list(given)


def run_compiler(argv: list[str], bundle: Path) -> None:
    """Run the compile command inside the bundle; the program must appear in ``qpc/``."""
    with step(f"compiling for Cloud AI 100 with {argv[0]}"):
        result = subprocess.run(argv, cwd=bundle, capture_output=True, text=True)
    if result.returncode != 0:
        output = (result.stdout + result.stderr).strip()[-4000:]
        raise QGraphError(f"the Cloud AI 100 compiler failed (exit {result.returncode}): {' '.join(argv)}\n{output}")
    if not (bundle / QPC_DIR / PROGRAM_FILE).is_file():
        raise QGraphError(f"the Cloud AI 100 compiler exited 0 but wrote no {QPC_DIR}/{PROGRAM_FILE}: {' '.join(argv)}")


class AI100Backend:
    """Cloud AI 100: static shapes, KV retained on the card, fp16 compute, RMSNorm as the CustomRMSNorm function."""

    name: ClassVar[str] = "ai100"
    # No "float32": the compiler converts the graph to fp16 (-convert-to-fp16), so the pipeline clips constants.
    # CustomRMSNorm: on the float32 graph it is handed and on the float16 one it compiles it to.
    capabilities: ClassVar[Capabilities] = Capabilities(
        retained_state=True,
        dtypes=frozenset({"float16", "mxfp6", "mxint8"}),
        kernels=frozenset({Kernel(CUSTOM_RMSNORM.domain, CUSTOM_RMSNORM.op_type, frozenset({"float32", "float16"}))}),
        static_shapes=True,
        continuous_batching=True,  # full_batch_size: the kv-batch-index pass and QEfficient's batch_index protocol
    )
    used_options: ClassVar[frozenset[str]] = BUNDLE_OPTIONS | {"num_cores", "compiler", "device_ids"}

    @property
    def version(self) -> str:
        return f"bundle-{BUNDLE_FORMAT};compiler={compiler_identity(find_compiler())}"

    def pipeline(self, options: CompileOptions) -> list[PassSpec]:
        """The standard pipeline, RMSNorm lowered to the card's own CustomRMSNorm (offered to ``rmsnorm-fuse``)."""
        return standard_pipeline(self.capabilities, options, offered=[CUSTOM_RMSNORM])

    def check_options(self, options: CompileOptions) -> None:
        """Refuse bad ai100 options (flags, ``mos``, ``num_devices``, ``device_ids``) before any export."""
        device_ids(options, BundleSettings.from_options(options))

    def compile(self, model: ir.Model, options: CompileOptions, artifact_dir: Path) -> None:
        settings = BundleSettings.from_options(options)
        device_ids(options, settings)  # reject a bad card list now, not at first generate
        compiler = find_compiler(options.extra.get("compiler"))
        argv = write_bundle(model, settings, compiler or STANDARD_COMPILERS[0], artifact_dir)
        if compiler is not None:
            run_compiler(argv, artifact_dir)
        else:
            log.warning(
                "no Cloud AI 100 compiler here (%s not found; the ai100 option compiler=PATH names another): wrote "
                "the compile bundle only. To finish, run %s in it on a machine with the card.",
                STANDARD_COMPILERS[0],
                SCRIPT_FILE,
            )
        write_manifest(artifact_dir, argv, settings, compiled=compiler is not None)

    def load(self, artifact_dir: Path, options: CompileOptions):
        manifest = read_manifest(artifact_dir)
        if not (artifact_dir / QPC_DIR / PROGRAM_FILE).is_file():
            raise BackendUnavailableError(
                "generating on Cloud AI 100 needs the card and its SDK, and this bundle was never compiled (no "
                f"compiler on this machine). The bundle is ready: {finish_instructions(artifact_dir)}"
            )
        from qgraph.backends.ai100_session import QAICDecoderSession, import_sdk

        try:
            import_sdk()
        except ImportError as exc:
            raise BackendUnavailableError(
                f"generating on Cloud AI 100 needs the SDK's Python runtime (qaicrt), which is not importable here "
                f"({exc}). The compiled program is in {artifact_dir / QPC_DIR}; run on a machine with the card, or "
                f"{finish_instructions(artifact_dir)}"
            ) from exc
        settings = BundleSettings.from_options(options)
        return QAICDecoderSession(
            artifact_dir / QPC_DIR,
            device_ids(options, settings),
            prefill_seq_len=manifest["prefill_seq_len"],
            ctx_len=manifest["ctx_len"],
            batch_size=manifest["batch_size"],
            full_batch_size=manifest.get("full_batch_size"),
            num_speculative_tokens=manifest.get("num_speculative_tokens"),
        )

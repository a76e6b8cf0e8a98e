"""The Cloud AI 100 compile bundle: what the SDK's compiler reads, written from the compile options by fixed rules.

A bundle is a directory that compiles on any machine with the card, with nothing but the SDK:

- ``model.onnx`` (+ ``model.onnx.data``): the retained-state graph, its I/O dimensions named after the
  specialization symbols (``batch_size``, ``seq_len``, ``ctx_len``);
- ``specializations.json``: one prefill entry (``seq_len`` = prefill length) and one decode entry (``seq_len`` 1),
  with ``num_speculative_tokens=k`` a verification entry (``seq_len`` k + 1), as QEfficient's target-model bundle;
- ``custom_io.yaml``: every ``past_*`` input and ``*_RetainedState`` output with its on-device precision;
- ``mdp_partition.json`` when the program spans several cards;
- ``compile.sh``: the exact ``qaic-exec`` command line, and ``bundle.json``, the same facts as data.

Everything here is pure: options in, files and argv out. Running the compiler and the runtime is ``ai100.py``'s job.
The conventions (as QEfficient uses the SDK) are summarised in ``docs/design.md`` ("Backends").
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx_ir as ir

from qgraph import contract
from qgraph.backend_api import CompileOptions
from qgraph.contract import BATCH_INDEX, INPUT_IDS, LOGITS, POSITION_IDS
from qgraph.errors import QGraphError

MODEL_FILE = "model.onnx"
SPECIALIZATIONS_FILE = "specializations.json"
CUSTOM_IO_FILE = "custom_io.yaml"
MDP_FILE = "mdp_partition.json"
SCRIPT_FILE = "compile.sh"
MANIFEST_FILE = "bundle.json"
QPC_DIR = "qpc"
PROGRAM_FILE = "programqpc.bin"
BUNDLE_FORMAT = 1

KV_PRECISIONS = {False: "float16", True: "mxint8"}  # keyed by mxint8_kv_cache

# Options this module acts on (beside the core shapes and num_cores); the backend declares them as used.
BUNDLE_OPTIONS = frozenset(
    {"mxfp6_matmul", "mxint8_kv_cache", "mos", "aic_enable_depth_first", "num_devices", "compiler_options"}
)
# Flags the bundle itself decides; a compiler_options entry may not override them.
RESERVED_FLAGS = frozenset(
    {
        "m",
        "network_specialization_config",
        "custom_IO_list_file",
        "aic_binary_dir",
        "mdp_load_partition_config",
        "retained_state",
        "compile_only",
        "aic_num_cores",
    }
)


@dataclass(frozen=True)
class BundleSettings:
    """The AI100 compile options, validated: everything that decides the bundle's files and command line."""

    batch_size: int
    prefill_seq_len: int
    ctx_len: int
    num_cores: int = 16
    mxfp6_matmul: bool = False
    mxint8_kv_cache: bool = False
    mos: int | None = None
    aic_enable_depth_first: bool = False
    num_devices: int = 1
    compiler_options: Mapping[str, Any] = field(default_factory=dict)
    full_batch_size: int | None = None  # continuous batching: KV slots, selected per run by batch_index
    num_speculative_tokens: int | None = None  # speculative decoding: a verification specialization of k + 1 tokens

    @classmethod
    def from_options(cls, options: CompileOptions) -> BundleSettings:
        extra = options.extra

        def flag(name: str) -> bool:
            value = extra.get(name, False)
            if not isinstance(value, bool):
                raise QGraphError(f"ai100 option {name} must be true or false, got {value!r}")
            return value

        mos = extra.get("mos")
        if mos is not None and mos != -1 and (isinstance(mos, bool) or not isinstance(mos, int) or mos < 1):
            raise QGraphError(f"ai100 option mos must be a positive integer (or -1 for unset), got {mos!r}")
        num_devices = extra.get("num_devices", 1)
        if isinstance(num_devices, bool) or not isinstance(num_devices, int) or num_devices < 1:
            raise QGraphError(f"ai100 option num_devices must be a positive integer, got {num_devices!r}")
        if isinstance(options.num_cores, bool) or not isinstance(options.num_cores, int) or options.num_cores < 1:
            raise QGraphError(f"num_cores must be a positive integer, got {options.num_cores!r}")
        passthrough = dict(extra.get("compiler_options") or {})
        clash = sorted(set(passthrough) & (RESERVED_FLAGS | BUNDLE_OPTIONS))
        if clash:
            raise QGraphError(
                f"compiler_options may not set {', '.join(clash)}: the bundle decides these "
                "(use the ai100 options mxfp6_matmul, mos, aic_enable_depth_first, num_devices, num_cores instead)"
            )
        return cls(
            batch_size=options.batch_size,
            prefill_seq_len=options.prefill_seq_len,
            ctx_len=options.ctx_len,
            num_cores=options.num_cores,
            mxfp6_matmul=flag("mxfp6_matmul"),
            mxint8_kv_cache=flag("mxint8_kv_cache"),
            mos=None if mos in (None, -1) else int(mos),
            aic_enable_depth_first=flag("aic_enable_depth_first"),
            num_devices=int(num_devices),
            compiler_options=passthrough,
            full_batch_size=options.full_batch_size,
            num_speculative_tokens=options.num_speculative_tokens,
        )

    @property
    def kv_precision(self) -> str:
        return KV_PRECISIONS[self.mxint8_kv_cache]


# -- the graph --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RetainedIO:
    """The retained-state I/O of a graph: KV inputs and their ``_RetainedState`` outputs, in graph order."""

    kv_inputs: list[str]
    kv_outputs: list[str]


def retained_io(graph: ir.Graph) -> RetainedIO:
    """Check the retained-state contract the bundle relies on; raise naming what is missing."""
    problems = contract.retained_state_problems(graph, complete=True)
    if problems:
        raise QGraphError(
            "the ai100 bundle needs the retained-state graph (the kv-retained-state pass): " + "; ".join(problems)
        )
    kv_inputs = [p.input.name for p in contract.kv_pairs(graph)]
    kv_outputs = [v.name for v in graph.outputs if contract.is_retained_output(v.name)]
    return RetainedIO(kv_inputs, kv_outputs)


def name_specialization_dims(graph: ir.Graph, ctx_len: int) -> None:
    """Name the I/O dimensions after the specialization symbols the compiler binds.

    ``specializations.json`` gives values to ``batch_size``, ``seq_len`` and ``ctx_len``; the compiler finds them as
    symbolic dimensions of the graph's inputs and outputs. The export's own batch and sequence symbols are renamed
    everywhere in the graph (so intermediate shape annotations stay consistent); the KV length, fixed at ``ctx_len``
    by the KV pass, becomes the symbol ``ctx_len`` on the KV inputs and outputs.
    """
    ids = next(v for v in graph.inputs if v.name == INPUT_IDS)
    # continuous batching: the KV buffers hold full_batch_size slots, a run's batch_index names the ones it uses
    kv_batch = "full_batch_size" if any(v.name == BATCH_INDEX for v in graph.inputs) else "batch_size"
    if ids.shape is None or ids.shape.rank() != 2:
        raise QGraphError(f"input_ids must have rank 2 [batch, seq], got shape {ids.shape}")
    renames: dict[str, str] = {}
    for dim, symbol in zip(ids.shape.dims, ("batch_size", "seq_len"), strict=True):
        if isinstance(dim, ir.SymbolicDim) and dim.value is not None:
            renames[dim.value] = symbol
    io = set(graph.inputs) | set(graph.outputs)
    values = set(io)
    for node in ir.traversal.RecursiveGraphIterator(graph):
        values.update(v for v in node.outputs)
    for value in values:
        if value.shape is None:
            continue
        dims = list(value.shape.dims)
        changed = False
        for i, dim in enumerate(dims):
            if isinstance(dim, ir.SymbolicDim) and dim.value in renames:
                dims[i], changed = ir.SymbolicDim(renames[dim.value]), True
        name = value.name or ""
        if value in io and (contract.is_retained_input(name) or contract.is_retained_output(name)):
            if len(dims) != 4 or dims[2] not in (ctx_len, "ctx_len"):
                raise QGraphError(f"{name} has shape {value.shape}; expected [batch, heads, {ctx_len}, head_dim]")
            dims[0], dims[2], changed = ir.SymbolicDim(kv_batch), ir.SymbolicDim("ctx_len"), True
        elif value in io and name in (INPUT_IDS, POSITION_IDS, LOGITS):
            # speculative logits keep min(seq_len, k + 1) positions: that dimension is the compiler's to infer
            kept = name == LOGITS and len(dims) == 3 and getattr(dims[1], "value", None) == "logits_positions"
            dims[0], changed = ir.SymbolicDim("batch_size"), True
            dims[1] = dims[1] if kept else ir.SymbolicDim("seq_len")
        elif value in io and name == BATCH_INDEX:
            dims, changed = [ir.SymbolicDim("batch_size"), 1], True
        if changed:
            value.shape = ir.Shape(dims)


# -- the files --------------------------------------------------------------------------------------------------


def specializations(settings: BundleSettings) -> dict[str, list[dict[str, str]]]:
    """Prefill then decode (then verification), values as strings (the plain-list form every SDK version accepts).

    With ``full_batch_size`` (QEfficient's continuous batching): prefill is one request (``batch_size`` 1) into the
    slot its ``batch_index`` names, decode (and verification) runs all ``full_batch_size`` slots. With
    ``num_speculative_tokens=k`` a verification entry feeds ``k + 1`` tokens per row."""
    verify = (settings.num_speculative_tokens + 1,) if settings.num_speculative_tokens else ()
    if settings.full_batch_size:
        fbs, ctx = str(settings.full_batch_size), str(settings.ctx_len)
        prefill = str(settings.prefill_seq_len)
        entries = [{"batch_size": "1", "seq_len": prefill, "ctx_len": ctx, "full_batch_size": fbs}]
        for seq_len in dict.fromkeys((1, *verify)):
            entries.append({"batch_size": fbs, "seq_len": str(seq_len), "ctx_len": ctx, "full_batch_size": fbs})
        return {"specializations": entries}
    entries = []
    for seq_len in dict.fromkeys((settings.prefill_seq_len, 1, *verify)):  # no repeats (prefill of one token)
        entries.append(
            {"batch_size": str(settings.batch_size), "seq_len": str(seq_len), "ctx_len": str(settings.ctx_len)}
        )
    return {"specializations": entries}


def custom_io_yaml(io: RetainedIO, precision: str) -> str:
    """One ``IOName``/``Precision`` entry per KV input and per ``_RetainedState`` output."""
    return "".join(f" - IOName: {name}\n   Precision: {precision}\n\n" for name in io.kv_inputs + io.kv_outputs)


def mdp_partition(settings: BundleSettings) -> dict[str, Any]:
    """One partition over ``num_devices`` cards connected peer to peer, ``num_cores`` cores on each."""
    devices = list(range(settings.num_devices))
    return {
        "connections": [{"devices": devices, "type": "p2p"}],
        "partitions": [
            {"name": "Partition0", "devices": [{"deviceId": d, "numCores": settings.num_cores} for d in devices]}
        ],
    }


def option_flag(name: str, value: Any) -> str | None:
    """The one rule: ``snake_case`` -> ``-snake-case``; ``True`` -> bare flag; ``False``/``None`` -> absent;
    anything else -> ``=value``."""
    if value is None or value is False:
        return None
    dashed = "-" + name.replace("_", "-")
    return dashed if value is True else f"{dashed}={value}"


def compiler_flags(settings: BundleSettings) -> dict[str, Any]:
    """Every ``qaic-exec`` option as ``name -> value``, in command-line order (paths relative to the bundle)."""
    flags: dict[str, Any] = {
        "m": MODEL_FILE,
        "aic_hw": True,
        "aic_hw_version": "2.0",
        "compile_only": True,
        "retained_state": True,
        "convert_to_fp16": True,
        "aic_num_cores": settings.num_cores,
        "network_specialization_config": SPECIALIZATIONS_FILE,
        "custom_IO_list_file": CUSTOM_IO_FILE,
        "aic_binary_dir": QPC_DIR,
        "mxfp6_matmul": settings.mxfp6_matmul,
        "mos": settings.mos,
        "aic_enable_depth_first": settings.aic_enable_depth_first,
        "mdp_load_partition_config": MDP_FILE if settings.num_devices > 1 else None,
    }
    flags.update(settings.compiler_options)  # e.g. aic_hw_version, or flags this module does not know
    return flags


def compile_command(compiler: str | Path, settings: BundleSettings) -> list[str]:
    """The exact argv of the compile, run from inside the bundle directory."""
    argv = [str(compiler)]
    for name, value in compiler_flags(settings).items():
        flag = option_flag(name, value)
        if flag is not None:
            argv.append(flag)
    return argv


def compile_script(argv: list[str]) -> str:
    lines = " \\\n  ".join(shlex.quote(a) for a in argv)
    return (
        "#!/bin/sh\n"
        "# Cloud AI 100 compile bundle written by qgraph. Run it on a machine with the Cloud AI 100 SDK:\n"
        f"# it compiles {MODEL_FILE} into {QPC_DIR}/{PROGRAM_FILE} (the program the SDK runtime loads).\n"
        "set -e\n"
        'cd "$(dirname "$0")"\n'
        f"rm -rf {QPC_DIR}\n"
        f"{lines}\n"
    )


def finish_instructions(directory: Path) -> str:
    """How to turn a bundle into a running program on a machine that has the card."""
    return (
        f"copy {directory} to a machine with a Cloud AI 100 card and its SDK (/opt/qti-aic), run "
        f"`sh {SCRIPT_FILE}` inside it (writes {QPC_DIR}/{PROGRAM_FILE}), or rerun the same qgraph command there"
    )


def write_bundle(model: ir.Model, settings: BundleSettings, compiler: str | Path, directory: Path) -> list[str]:
    """Write every file of the bundle into ``directory``; return the compile argv (to run from ``directory``)."""
    io = retained_io(model.graph)
    name_specialization_dims(model.graph, settings.ctx_len)
    ir.save(model, directory / MODEL_FILE, external_data=MODEL_FILE + ".data")
    (directory / SPECIALIZATIONS_FILE).write_text(json.dumps(specializations(settings), indent=4) + "\n")
    (directory / CUSTOM_IO_FILE).write_text(custom_io_yaml(io, settings.kv_precision))
    if settings.num_devices > 1:
        (directory / MDP_FILE).write_text(json.dumps(mdp_partition(settings), indent=4) + "\n")
    argv = compile_command(compiler, settings)
    script = directory / SCRIPT_FILE
    script.write_text(compile_script(argv))
    script.chmod(0o755)
    return argv


def write_manifest(directory: Path, argv: list[str], settings: BundleSettings, compiled: bool) -> None:
    manifest = {
        "format": BUNDLE_FORMAT,
        "command": argv,
        "compiled": compiled,
        "program": f"{QPC_DIR}/{PROGRAM_FILE}",
        "batch_size": settings.batch_size,
        "full_batch_size": settings.full_batch_size,
        "prefill_seq_len": settings.prefill_seq_len,
        "num_speculative_tokens": settings.num_speculative_tokens,
        "ctx_len": settings.ctx_len,
        "num_devices": settings.num_devices,
        "kv_precision": settings.kv_precision,
    }
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")


def read_manifest(directory: Path) -> dict[str, Any]:
    path = directory / MANIFEST_FILE
    if not path.is_file():
        raise QGraphError(f"{directory} is not an ai100 bundle (no {MANIFEST_FILE})")
    return json.loads(path.read_text())

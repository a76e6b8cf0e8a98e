"""The ONNX Runtime options a user may give to ``compile``: ``providers`` and ``session_options``, checked up front.

Only session options that make sense for running a compiled artifact are accepted; those that write files
(``optimized_model_filepath`` overwrote any file it was given, ``profile_file_prefix`` writes anywhere) or reach into
ORT's internals are refused with the list of allowed ones. Values are checked for type and range before any export.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from qgraph.backend_api import CompileOptions
from qgraph.errors import QGraphError

DEFAULT_PROVIDER = "CPUExecutionProvider"
OPT_LEVELS = {
    "disable": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}
EXECUTION_MODES = {"sequential": "ORT_SEQUENTIAL", "parallel": "ORT_PARALLEL"}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_bool(value: Any) -> bool:
    return isinstance(value, bool)


# option -> (what a valid value is, its check)
ALLOWED_SESSION_OPTIONS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "graph_optimization_level": (f"one of {sorted(OPT_LEVELS)}", lambda v: isinstance(v, str) and v in OPT_LEVELS),
    "execution_mode": (f"one of {sorted(EXECUTION_MODES)}", lambda v: isinstance(v, str) and v in EXECUTION_MODES),
    "intra_op_num_threads": ("an int >= 0 (0: ONNX Runtime's default)", lambda v: _is_int(v) and v >= 0),
    "inter_op_num_threads": ("an int >= 0 (0: ONNX Runtime's default)", lambda v: _is_int(v) and v >= 0),
    "log_severity_level": ("an int from 0 (verbose) to 4 (fatal)", lambda v: _is_int(v) and 0 <= v <= 4),
    "log_verbosity_level": ("an int >= 0", lambda v: _is_int(v) and v >= 0),
    "enable_cpu_mem_arena": ("true or false", _is_bool),
    "enable_mem_pattern": ("true or false", _is_bool),
    "enable_mem_reuse": ("true or false", _is_bool),
    "use_deterministic_compute": ("true or false", _is_bool),
    # whether idle intra-op threads spin waiting for work (ONNX Runtime's default: true). Two sessions that take turns
    # on the same cores (a speculative draft model and its target) steal each other's time while they spin.
    "allow_spinning": ("true or false", _is_bool),
}
# options that are session config entries rather than SessionOptions attributes
CONFIG_ENTRIES = {"allow_spinning": "session.intra_op.allow_spinning"}


def check_session_options(settings: Any) -> dict[str, Any]:
    """``settings`` as a dict of allowed session options with valid values, or a ``QGraphError`` naming the fix."""
    if not isinstance(settings, dict):
        raise QGraphError(f"session_options must be a dict of option: value, got {type(settings).__name__}")
    for key, value in settings.items():
        if key not in ALLOWED_SESSION_OPTIONS:
            raise QGraphError(
                f"session option {key!r} is not allowed (options that write files or reach into ONNX Runtime's "
                f"internals are refused); allowed: {', '.join(sorted(ALLOWED_SESSION_OPTIONS))}"
            )
        expected, valid = ALLOWED_SESSION_OPTIONS[key]
        if not valid(value):
            raise QGraphError(f"session option {key!r} must be {expected}, got {value!r}")
    return dict(settings)


def session_options(settings: dict[str, Any]):
    """An ``onnxruntime.SessionOptions`` from checked ``settings``."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    for key, value in check_session_options(settings).items():
        if key == "graph_optimization_level":
            value = getattr(ort.GraphOptimizationLevel, OPT_LEVELS[value])
        elif key == "execution_mode":
            value = getattr(ort.ExecutionMode, EXECUTION_MODES[value])
        if key in CONFIG_ENTRIES:
            options.add_session_config_entry(CONFIG_ENTRIES[key], "1" if value else "0")
        else:
            setattr(options, key, value)
    return options


def providers(options: CompileOptions) -> list[str]:
    """The providers asked for (``providers=``: a name or a list), in priority order; the CPU by default.

    A single name (what ``--option providers=X`` gives) is one provider, not a list of its characters.
    """
    given = options.extra.get("providers") or [DEFAULT_PROVIDER]
    names = [given] if isinstance(given, str) else given
    if not isinstance(names, list | tuple) or not all(isinstance(p, str) for p in names):
        raise QGraphError(f"providers must be a provider name or a list of names, got {given!r}")
    return list(names)


def check_options(options: CompileOptions) -> None:
    """Refuse bad ``providers`` (of a wrong type, or names this ONNX Runtime does not know) or ``session_options``
    before any export."""
    import onnxruntime as ort

    unknown = [p for p in providers(options) if p not in ort.get_all_providers()]
    if unknown:
        raise QGraphError(
            f"unknown ONNX Runtime provider(s) {', '.join(unknown)}; known: {', '.join(ort.get_all_providers())} "
            f"(installed here: {', '.join(ort.get_available_providers())})"
        )
    check_session_options(options.extra.get("session_options") or {})

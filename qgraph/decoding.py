"""The options of one generate call: HF transformers' names, the model's generation_config as defaults, checked.

Unknown arguments are an error naming them and the accepted ones (code written for transformers or QEfficient that
passes an option qgraph would ignore must not silently get different output). QEfficient's own ``generate``
arguments that mean nothing here (``device_id``, ...) are accepted with a one-line note.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qgraph.errors import QGraphError
from qgraph.sampling import SamplingOptions

# transformers' global defaults for the sampling warpers (GenerationConfig._get_default_generation_params)
HF_DEFAULTS: dict[str, Any] = {
    "do_sample": False,
    "temperature": 1.0,
    "top_k": 50,
    "top_p": 1.0,
    "min_p": None,
    "repetition_penalty": 1.0,
}
SAMPLING_NAMES = ("do_sample", "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed")
# speculative decoding, transformers' names: prompt lookup (k guesses) or a draft model (guessing k at a time)
SPECULATION_NAMES = ("prompt_lookup_num_tokens", "assistant_model", "num_assistant_tokens")
OPTION_NAMES = (
    *SAMPLING_NAMES,
    "max_new_tokens",
    "generation_len",
    "stop",
    "stop_strings",
    "eos_token_id",
    *SPECULATION_NAMES,
)
# QEfficient's generate / cloud_ai_100_exec_kv arguments: accepted, with why they change nothing here
QEFF_IGNORED = {
    "device_id": "the backend chooses its device at compile/load time",
    "runtime_ai100": "the compiled backend decides where it runs",
    "enable_debug_logs": "use the logging module",
    "write_io_dir": "qgraph does not dump I/O tensors",
    "automation": "the result object carries the outputs",
    "prompts_txt_file_path": "pass the prompts themselves",
}


@dataclass(frozen=True)
class GenerationOptions:
    """Everything that decides one request's tokens and where it stops."""

    sampling: SamplingOptions = field(default_factory=SamplingOptions)
    max_new_tokens: int | None = None  # None: until EOS, a stop string or the end of ctx_len
    stop: tuple[str, ...] = ()
    eos_token_ids: frozenset[int] = frozenset()
    # speculative decoding (changes the speed, never greedy's tokens nor sampling's distribution)
    prompt_lookup_num_tokens: int | None = None
    assistant_model: Any = None  # a compiled QEFFAutoModelForCausalLM with the same tokenizer
    num_assistant_tokens: int | None = None  # guesses per verification with assistant_model (default: all compiled)

    @property
    def speculative(self) -> bool:
        return self.prompt_lookup_num_tokens is not None or self.assistant_model is not None


def generation_config_defaults(config: Any = None, directory: str | Path | None = None) -> dict[str, Any]:
    """The options a model's generation_config sets (and only those): from a loaded ``GenerationConfig`` when there
    is one, else from ``generation_config.json`` in the model directory (no weights are loaded for it)."""
    if config is not None and hasattr(config, "to_diff_dict"):
        values = config.to_diff_dict()
    elif directory is not None and (Path(directory).expanduser() / "generation_config.json").is_file():
        values = json.loads((Path(directory).expanduser() / "generation_config.json").read_text())
    else:
        return {}
    wanted = (*HF_DEFAULTS, "max_new_tokens", "eos_token_id", "stop_strings")
    return {k: values[k] for k in wanted if values.get(k) is not None}


def resolve_options(
    given: Mapping[str, Any], defaults: Mapping[str, Any], tokenizer_eos: int | None = None
) -> tuple[GenerationOptions, list[str]]:
    """Options from the caller's arguments over the model's defaults over transformers'; returns them and notes.

    Raises ``QGraphError`` for an unknown argument or a value out of range.
    """
    notes = []
    unknown = sorted(k for k in given if k not in OPTION_NAMES and k not in QEFF_IGNORED)
    if unknown:
        raise QGraphError(
            f"unknown generate argument{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
            f"accepted: tokenizer, prompts, messages, stream, verbose, {', '.join(OPTION_NAMES)}"
        )
    for name in sorted(k for k in given if k in QEFF_IGNORED):
        notes.append(f"{name} is ignored: {QEFF_IGNORED[name]}")
    given = {k: v for k, v in given.items() if k not in QEFF_IGNORED}
    length = _max_new_tokens(given, defaults)
    stop = given.get("stop", given.get("stop_strings", defaults.get("stop_strings")))
    values = {k: given.get(k, defaults.get(k, default)) for k, default in HF_DEFAULTS.items()}
    sampling = SamplingOptions(
        do_sample=_boolean("do_sample", values["do_sample"]),
        temperature=_number("temperature", values["temperature"], low=0.0, low_open=True),
        top_k=_integer("top_k", values["top_k"], low=0) if values["top_k"] is not None else None,
        top_p=_number("top_p", values["top_p"], low=0.0, low_open=True, high=1.0),
        min_p=_number("min_p", values["min_p"], low=0.0, high=1.0) if values["min_p"] is not None else None,
        repetition_penalty=_number("repetition_penalty", values["repetition_penalty"], low=0.0, low_open=True),
        seed=_seed(given.get("seed")),
    )
    ignored = [k for k in ("temperature", "top_k", "top_p", "min_p") if k in given]
    if ignored and not sampling.do_sample:
        notes.append(f"do_sample is False, so {', '.join(ignored)} change nothing (greedy); pass do_sample=True")
    eos = given.get("eos_token_id", defaults.get("eos_token_id", tokenizer_eos))
    options = GenerationOptions(
        sampling, length, _stop_strings(stop), _token_ids("eos_token_id", eos), **_speculation(given)
    )
    return options, notes


def _speculation(given: Mapping[str, Any]) -> dict[str, Any]:
    lookup, assistant = given.get("prompt_lookup_num_tokens"), given.get("assistant_model")
    assistant_tokens = given.get("num_assistant_tokens")
    if lookup is not None and assistant is not None:
        raise QGraphError(
            "prompt_lookup_num_tokens and assistant_model choose two different proposers for speculative decoding; "
            "give one"
        )
    if assistant_tokens is not None and assistant is None:
        raise QGraphError("num_assistant_tokens needs assistant_model (the draft model whose guesses it counts)")
    if assistant is not None and not hasattr(assistant, "artifact"):
        raise QGraphError(
            f"assistant_model must be a QEFFAutoModelForCausalLM (compiled), got {type(assistant).__name__}"
        )
    return {
        "prompt_lookup_num_tokens": None if lookup is None else _integer("prompt_lookup_num_tokens", lookup, low=1),
        "assistant_model": assistant,
        "num_assistant_tokens": (
            None if assistant_tokens is None else _integer("num_assistant_tokens", assistant_tokens, low=1)
        ),
    }


def _max_new_tokens(given: Mapping[str, Any], defaults: Mapping[str, Any]) -> int | None:
    a, b = given.get("max_new_tokens"), given.get("generation_len")
    if a is not None and b is not None and a != b:
        raise QGraphError(f"max_new_tokens={a} and generation_len={b} disagree: they are one option, give one")
    value = a if a is not None else b if b is not None else defaults.get("max_new_tokens")
    return None if value is None else _integer("max_new_tokens", value, low=1)


def _boolean(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise QGraphError(f"{name} must be True or False, got {value!r}")
    return value


def _integer(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise QGraphError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    if value < low:
        raise QGraphError(f"{name} must be >= {low}, got {value}")
    return value


def _number(name: str, value: Any, low: float, low_open: bool = False, high: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise QGraphError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    if (value <= low if low_open else value < low) or (high is not None and value > high):
        bound = f"{'>' if low_open else '>='} {low}" + (f" and <= {high}" if high is not None else "")
        raise QGraphError(f"{name} must be {bound}, got {value}")
    return float(value)


def _seed(value: Any) -> int | None:
    return None if value is None else _integer("seed", value, low=0)


def _stop_strings(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    strings = (value,) if isinstance(value, str) else value
    if not isinstance(strings, Sequence) or not all(isinstance(s, str) and s for s in strings):
        raise QGraphError(f"stop must be a non-empty string or a list of them, got {value!r}")
    return tuple(strings)


def _token_ids(name: str, value: Any) -> frozenset[int]:
    if value is None:
        return frozenset()
    ids = [value] if isinstance(value, int) else value
    if not isinstance(ids, Sequence) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise QGraphError(f"{name} must be a token id or a list of them, got {value!r}")
    return frozenset(ids)

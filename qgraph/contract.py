"""The graph contracts every layer agrees on: the vanilla export's names and the retained-state I/O.

This module is the only place these names are spelled (``tests/test_contract.py`` greps the package for them). The
export writes the vanilla names; ``kv-retained-state`` turns them into the retained-state ones; later passes, the
verifier, the backends and their sessions read them back through the constants and helpers here.

Vanilla decoder (``qgraph.export``): inputs ``input_ids[b, s]``, ``attention_mask[b, t]``, ``position_ids[b, s]``
(when the model's forward takes them), ``past_key_values.{i}.key|value``; outputs ``logits[b, s, V]``,
``present.{i}.key|value``.

Retained state (after ``kv-retained-state``): inputs ``input_ids[b, s]``, ``position_ids[b, s]`` (-1 marks padding),
``past_key.{i}`` / ``past_value.{i}`` of fixed shape ``[b, kv_heads, ctx_len, head_dim]``; outputs ``logits`` and
``past_key.{i}_RetainedState`` / ``past_value.{i}_RetainedState``, the same buffers after the step's K/V were written
at ``position_ids``. No ``attention_mask``: the mask is derived from ``position_ids`` inside the graph. Prefill and
decode are the same graph at two sequence lengths. See ``docs/design.md``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: a process that runs a compiled artifact needs no graph library
    import onnx_ir as ir

__all__ = [
    "ATTENTION_MASK",
    "BATCH_INDEX",
    "INPUT_IDS",
    "KV_KINDS",
    "LOGITS",
    "LOGITS_POSITIONS_METADATA",
    "POSITION_IDS",
    "RETAINED_SUFFIX",
    "STATE_UPDATES",
    "KVPair",
    "is_retained_input",
    "is_retained_output",
    "kv_pairs",
    "retained_buffers",
    "retained_inputs",
    "retained_input_name",
    "retained_output_name",
    "retained_state_problems",
    "vanilla_past",
    "vanilla_past_name",
    "vanilla_present_name",
]

INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
POSITION_IDS = "position_ids"
LOGITS = "logits"
# Continuous batching (``kv-batch-index``): which of the ``full_batch_size`` KV slots each row of a run reads and
# writes, QEfficient's name for it. An optional input of the retained-state contract.
BATCH_INDEX = "batch_index"
KV_KINDS = ("key", "value")
# Model metadata written by ``last-token-logits``: the logits keep the last min(s, n) tokens of each row (n = its
# value; speculative verification); absent, a ``[b, 1, V]`` logits output keeps the last token, any other every one.
LOGITS_POSITIONS_METADATA = "qgraph.logits_positions"

_VANILLA_PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
_RETAINED_INPUT = re.compile(r"^past_(key|value)\.(\d+)$")
RETAINED_SUFFIX = "_RetainedState"
# What the contract's KV names and patterns read as in a message, e.g. "no past_key.{i}/past_value.{i} inputs".
VANILLA_PAST_PATTERN = "past_key_values.{i}.key|value"
RETAINED_INPUT_PATTERN = "past_key.{i}/past_value.{i}"


# -- the vanilla export ---------------------------------------------------------------------------------------------


def vanilla_past_name(layer: int, kind: str) -> str:
    return f"past_key_values.{layer}.{kind}"


def vanilla_present_name(layer: int, kind: str) -> str:
    return f"present.{layer}.{kind}"


def vanilla_past(name: str | None) -> tuple[int, str] | None:
    """``(layer, kind)`` of a vanilla past input's name, else None."""
    match = _VANILLA_PAST.match(name or "")
    return (int(match.group(1)), match.group(2)) if match else None


# -- the retained state ---------------------------------------------------------------------------------------------


def retained_input_name(layer: int, kind: str) -> str:
    return f"past_{kind}.{layer}"


def retained_output_name(input_name: str) -> str:
    """The output that holds ``input_name``'s buffer after the step."""
    return input_name + RETAINED_SUFFIX


def is_retained_input(name: str | None) -> bool:
    return _RETAINED_INPUT.match(name or "") is not None


def is_retained_output(name: str | None) -> bool:
    return (name or "").endswith(RETAINED_SUFFIX) and is_retained_input((name or "")[: -len(RETAINED_SUFFIX)])


@dataclass(frozen=True)
class KVPair:
    """One retained buffer: its input and the output that carries it to the next step (None when missing)."""

    layer: int
    kind: str  # "key" or "value"
    input: ir.Value
    output: ir.Value | None


def kv_pairs(graph: ir.Graph) -> list[KVPair]:
    """Every ``past_{kind}.{i}`` input with its ``_RetainedState`` output, in graph input order."""
    outputs = {v.name: v for v in graph.outputs}
    pairs = []
    for value in graph.inputs:
        match = _RETAINED_INPUT.match(value.name or "")
        if match:
            pairs.append(
                KVPair(int(match.group(2)), match.group(1), value, outputs.get(retained_output_name(value.name)))
            )
    return pairs


def retained_state_problems(graph: ir.Graph, ctx_len: int | None = None, complete: bool = False) -> list[str]:
    """What keeps ``graph`` from the retained-state contract (empty when it holds).

    ``ctx_len``: the buffers' length on axis -2 must be this. ``complete``: the whole I/O is checked too, a
    ``logits`` output and no input beyond the contract's (a target that binds every input itself, like a compiled
    program, has nothing to feed any other).
    """
    names_in = [v.name for v in graph.inputs]
    names_out = [v.name for v in graph.outputs]
    problems = []
    if ATTENTION_MASK in names_in:
        problems.append(f"{ATTENTION_MASK} is still an input")
    for required in (INPUT_IDS, POSITION_IDS):
        if required not in names_in:
            problems.append(f"{required} is not an input")
    if complete and LOGITS not in names_out:
        problems.append(f"{LOGITS} is not an output")
    pairs = kv_pairs(graph)
    if not pairs:
        problems.append(f"no {RETAINED_INPUT_PATTERN} inputs")
    for pair in pairs:
        shape = pair.input.shape
        if ctx_len is not None and (shape is None or shape.rank() < 2 or shape[-2] != ctx_len):
            problems.append(f"{pair.input.name} has shape {shape}, not ctx_len {ctx_len} on axis -2")
        if pair.output is None:
            problems.append(f"no output {retained_output_name(pair.input.name)}")
        if any(user.op_type == "Concat" for user, _ in pair.input.uses()):
            problems.append(f"{pair.input.name} is still appended to by a Concat")
    if complete:
        kv_names = {p.input.name for p in pairs}
        stray = [n for n in names_in if n not in {INPUT_IDS, POSITION_IDS, ATTENTION_MASK, BATCH_INDEX} | kv_names]
        if stray:
            problems.append(f"inputs the retained-state contract does not have: {', '.join(map(str, stray))}")
    return problems


def retained_inputs(names: Iterable[str]) -> list[str]:
    """The retained-state buffer inputs among ``names`` (e.g. a session's input names), in order."""
    return [n for n in names if is_retained_input(n)]


def retained_buffers(names: Iterable[str]) -> list[str]:
    """The retained-state buffers among ``names``, inputs and ``_RetainedState`` outputs alike, in order."""
    return [n for n in names if is_retained_input(n) or is_retained_output(n)]


# Which node updates a retained buffer in place: (op_type, domain) -> {index of a past input: index of the output
# that is the updated buffer}. A session may bind such a pair to one buffer when that node is the buffer's only
# data reader (the KV scatter ``kv-retained-state`` writes; ORT's GroupQueryAttention, past key/value -> present).
STATE_UPDATES = {
    ("ScatterElements", ""): {0: 0},
    ("ScatterND", ""): {0: 0},
    ("GroupQueryAttention", "com.microsoft"): {3: 1, 4: 2},
}

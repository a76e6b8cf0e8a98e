"""Checks of what a user hands to the API, made before any work: one ``QGraphError`` naming the problem and the fix.

A raw ``TypeError`` from deep inside transformers or ONNX Runtime, or a failure after a 70 s export, tells a user
neither what was wrong nor what to do; these checks do both, as early as the value is known.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from qgraph.errors import QGraphError

KV_PASS = "kv-retained-state"


def check_int(name: str, value: Any, minimum: int) -> int:
    """``value`` as an int >= ``minimum`` (bools, floats and strings are refused, not truncated or parsed)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise QGraphError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise QGraphError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_prompts(prompts: Any) -> list[str]:
    """``prompts`` (a string or a sequence of strings) as a non-empty list of strings that encode as UTF-8."""
    if prompts is None:
        raise QGraphError("prompts is None: give a string or a list of strings")
    if isinstance(prompts, str):
        prompts = [prompts]
    elif isinstance(prompts, bytes) or not isinstance(prompts, Sequence):
        raise QGraphError(f"prompts must be a string or a list of strings, got {type(prompts).__name__}")
    if not prompts:
        raise QGraphError("no prompts given: give a string or a non-empty list of strings")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise QGraphError(f"prompt {i} is a {type(prompt).__name__}, not a string: give text, e.g. str(value)")
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise QGraphError(
                f"prompt {i} is not valid text: {exc.reason} at character {exc.start} ({prompt[exc.start]!r}); "
                "remove it or decode the input with errors='replace'"
            ) from exc
    return list(prompts)


def check_token_ids(prompt_ids: Sequence[Sequence[int]], vocab_size: int | None) -> None:
    """Every prompt has tokens, each in ``[0, vocab_size)``: an id beyond it means a tokenizer for another model."""
    for i, ids in enumerate(prompt_ids):
        if len(ids) == 0:
            raise QGraphError(f"prompt {i} encodes to no tokens: give a non-empty prompt")
        if vocab_size is None:
            continue
        bad = [t for t in ids if not 0 <= int(t) < vocab_size]
        if bad:
            raise QGraphError(
                f"prompt {i} has token id {bad[0]} outside the model's vocabulary (0..{vocab_size - 1}): the "
                "tokenizer does not belong to this model; pass the model's own tokenizer"
            )


def check_pipeline(specs: Iterable[Any], default: Sequence[Any], ctx_len: int, registry) -> list[Any]:
    """An explicit pipeline, checked before the export against the registry and the backend's default pipeline.

    Unknown pass names and bad pass options fail here; when the backend's default pipeline makes the retained-state
    graph the runtime drives (``kv-retained-state``), the given one must too; that pass gets the compile's
    ``ctx_len`` unless it names the same one.
    """
    from qgraph.pass_manager import PassSpec, instantiate

    checked = []
    for spec in specs:
        if spec.name == KV_PASS:
            given = spec.options.get("ctx_len", ctx_len)
            if given != ctx_len:
                raise QGraphError(
                    f"pass {KV_PASS!r} has ctx_len {given!r} but the compile's ctx_len is {ctx_len}: drop the pass "
                    "option (the compile's is used) or make the two equal"
                )
            spec = PassSpec(spec.name, {**spec.options, "ctx_len": ctx_len})
        instantiate(spec, registry)  # an unknown name or bad options fail now, not after the export
        checked.append(spec)
    needs_kv = any(s.name == KV_PASS for s in default)
    if needs_kv and not any(s.name == KV_PASS for s in checked):
        names = ", ".join(s.name for s in default)
        raise QGraphError(
            f"the pipeline has no {KV_PASS!r} pass, so the graph cannot run with retained KV buffers; add it first "
            f"(the backend's default pipeline: {names})"
        )
    return checked

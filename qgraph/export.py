"""Export an unmodified HuggingFace causal LM to a "vanilla" ONNX decoder graph.

The model is exported as HF wrote it; every target-specific change happens later, as graph passes. The only thing
added is a thin wrapper that turns the flat KV tensors of the ONNX interface into the cache object HF expects.

Vanilla interface (the convention optimum and onnxruntime-genai use):
inputs ``input_ids[b,s]``, ``attention_mask[b,t]``, ``position_ids[b,s]``, ``past_key_values.{i}.key|value``;
outputs ``logits[b,s,V]``, ``present.{i}.key|value``. Models whose forward takes no ``position_ids`` (ALiBi models
that derive positions from ``attention_mask``) export without that input; the KV pass adds it back.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import re
import time
from dataclasses import dataclass

import onnx_ir as ir
import torch

from qgraph.contract import (
    ATTENTION_MASK,
    INPUT_IDS,
    KV_KINDS,
    LOGITS,
    POSITION_IDS,
    vanilla_past_name,
    vanilla_present_name,
)
from qgraph.errors import QGraphError

log = logging.getLogger(__name__)

# Distinct example sizes so the exporter cannot specialise one dynamic dim onto another.
_EXAMPLE_BATCH, _EXAMPLE_SEQ, _EXAMPLE_PAST = 2, 3, 5


@dataclass(frozen=True)
class KVLayout:
    """Shape facts about the model's KV cache, read from one real forward pass (no per-architecture tables).

    ``shapes`` holds ``(heads, head_dim)`` of every past tensor in input order (layer 0 key, layer 0 value, ...):
    grouped- and multi-query models have fewer KV heads than query heads, and keys and values need not share a size.
    ``takes_positions`` says whether the model's forward accepts ``position_ids`` (ALiBi models such as Bloom do not;
    their positions come from ``attention_mask``).
    """

    num_layers: int
    shapes: tuple[tuple[int, int], ...]
    dtype: torch.dtype
    takes_positions: bool = True

    @property
    def kv_heads(self) -> int:
        return self.shapes[0][0]

    @property
    def head_dim(self) -> int:
        return self.shapes[0][1]

    def past_names(self) -> list[str]:
        return [vanilla_past_name(i, kind) for i in range(self.num_layers) for kind in KV_KINDS]

    def present_names(self) -> list[str]:
        return [vanilla_present_name(i, kind) for i in range(self.num_layers) for kind in KV_KINDS]

    def input_names(self) -> list[str]:
        positions = [POSITION_IDS] if self.takes_positions else []
        return [INPUT_IDS, ATTENTION_MASK, *positions, *self.past_names()]


def _cache_tensors(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


def takes_position_ids(model: torch.nn.Module) -> bool:
    return POSITION_IDS in inspect.signature(model.forward).parameters


def probe_kv_layout(model: torch.nn.Module) -> KVLayout:
    """Run the model once and read layer count, KV heads and head sizes off the cache it returns.

    Fails, naming the layer, for caches that are not one ``[batch, kv_heads, seq, head_dim]`` key and value per
    layer (recurrent states, fused or 3-D caches): the vanilla interface and the retained-state pass need that form.
    """
    name = type(model).__name__
    with torch.no_grad():
        out = model(input_ids=torch.zeros((1, 2), dtype=torch.long), use_cache=True)
    cache = getattr(out, "past_key_values", None)
    layers = getattr(cache, "layers", None)
    if not layers:
        raise QGraphError(
            f"{name} returned no layered KV cache (got {type(cache).__name__}); qgraph's export expects a "
            "transformers Cache with one key and value tensor per layer"
        )
    shapes = []
    for i, layer in enumerate(layers):
        for kind in ("keys", "values"):
            tensor = getattr(layer, kind, None)
            if not isinstance(tensor, torch.Tensor) or tensor.dim() != 4:
                found = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
                raise QGraphError(
                    f"KV cache layer {i} of {name} ({type(layer).__name__}) holds {kind} {found}; qgraph's export "
                    "expects one [batch, kv_heads, seq, head_dim] key and value tensor per layer"
                )
            shapes.append((int(tensor.shape[1]), int(tensor.shape[3])))
    dtype = layers[0].keys.dtype
    return KVLayout(len(layers), tuple(shapes), dtype, takes_position_ids(model))


class FlatKVDecoder(torch.nn.Module):
    """(input_ids, attention_mask, position_ids, past) -> (logits, *present), with past as a flat tuple."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids, past):
        return self.decode(input_ids, attention_mask, past, position_ids=position_ids)

    def decode(self, input_ids, attention_mask, past, **positions):
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        # Plain growing layers for every layer, sliding-window ones included: a sliding layer would crop its
        # present to the window with Python-side counters the exporter bakes in as constants. The window stays
        # where HF also applies it, in the attention mask, so the graph keeps the whole history and masks it.
        cache = DynamicCache()
        cache.layers = [DynamicLayer() for _ in range(len(past) // 2)]
        for i, layer in enumerate(cache.layers):
            layer.keys, layer.values = past[2 * i], past[2 * i + 1]
            layer.is_initialized = True
            layer.device = input_ids.device
            layer.dtype = past[2 * i].dtype
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            past_key_values=cache,
            use_cache=True,
            **positions,
        )
        present = [t for pair in _cache_tensors(out.past_key_values) for t in pair]
        return (out.logits, *present)


class FlatKVDecoderWithoutPositions(FlatKVDecoder):
    """(input_ids, attention_mask, past) -> (logits, *present): for models whose forward takes no position_ids."""

    def forward(self, input_ids, attention_mask, past):
        return self.decode(input_ids, attention_mask, past)


def example_inputs(layout: KVLayout) -> tuple:
    b, s, p = _EXAMPLE_BATCH, _EXAMPLE_SEQ, _EXAMPLE_PAST
    input_ids = torch.ones((b, s), dtype=torch.long)
    attention_mask = torch.ones((b, p + s), dtype=torch.long)
    position_ids = torch.arange(p, p + s, dtype=torch.long).unsqueeze(0).expand(b, s).contiguous()
    past = tuple(torch.zeros((b, heads, p, dim), dtype=layout.dtype) for heads, dim in layout.shapes)
    if not layout.takes_positions:
        return input_ids, attention_mask, past
    return input_ids, attention_mask, position_ids, past


@contextlib.contextmanager
def _exportable_experts(model: torch.nn.Module):
    """Mixture-of-experts layers run as HF's ``batched_mm`` experts while exporting.

    transformers' default experts kernel (``grouped_mm``) is an opaque custom op the ONNX exporter cannot translate;
    ``batched_mm`` is the same computation (gather each token's expert weights, batched matmul, weighted sum) written
    in plain tensor ops. Models without experts are untouched; the previous choice is restored afterwards.
    """
    config = getattr(model, "config", None)
    current = getattr(config, "_experts_implementation", None)
    can_set = getattr(model, "_can_set_experts_implementation", lambda: False)
    if current is None or current == "batched_mm" or not can_set():
        yield
        return
    model.set_experts_implementation("batched_mm")
    try:
        yield
    finally:
        model.set_experts_implementation(current)


def _exporter_summary(exc: Exception, limit: int = 2000) -> str:
    """The exporter's own "Exception summary" (what failed, not its generic advice), else the message's start."""
    text = str(exc)
    marker = "## Exception summary"
    if marker in text:
        text = text[text.index(marker) + len(marker) :].split("(Refer to the full stack trace")[0]
    text = re.sub(r"\x1b\[[0-9;]*m", "", " ".join(text.split()))
    return text[:limit]


def export_vanilla(model: torch.nn.Module, opset: int = 20) -> ir.Model:
    """Export ``model`` (an HF ``*ForCausalLM`` in eval mode) and return the vanilla graph in memory."""
    from torch.export import Dim

    model.eval()
    layout = probe_kv_layout(model)
    batch, seq, past_seq, total_seq = Dim("batch"), Dim("seq_len"), Dim("past_seq_len"), Dim("total_seq_len")
    dynamic_shapes = {
        INPUT_IDS: {0: batch, 1: seq},
        ATTENTION_MASK: {0: batch, 1: total_seq},
        **({POSITION_IDS: {0: batch, 1: seq}} if layout.takes_positions else {}),
        "past": tuple({0: batch, 2: past_seq} for _ in range(2 * layout.num_layers)),
    }
    names_in = layout.input_names()
    wrapper = FlatKVDecoder(model) if layout.takes_positions else FlatKVDecoderWithoutPositions(model)
    names_out = [LOGITS, *layout.present_names()]
    start = time.perf_counter()
    chatter = io.StringIO()
    try:
        with torch.no_grad(), contextlib.redirect_stdout(chatter), _exportable_experts(model):
            program = torch.onnx.export(
                wrapper,
                example_inputs(layout),
                dynamo=True,
                opset_version=opset,
                dynamic_shapes=dynamic_shapes,
                input_names=names_in,
                output_names=names_out,
                optimize=True,
                verbose=False,
            )
    except Exception as exc:  # the exporter raises many types; the user needs to know which model step failed
        raise QGraphError(
            f"torch.onnx.export failed for {type(model).__name__}: {type(exc).__name__}: {_exporter_summary(exc)}"
        ) from exc
    log.debug("exporter output:\n%s", chatter.getvalue())
    log.info("exported %s in %.1f s", type(model).__name__, time.perf_counter() - start)
    ir_model = program.model
    ir_model.graph.name = type(model).__name__
    return ir_model

"""Export an unmodified HuggingFace causal LM to a "vanilla" ONNX decoder graph.

The model is exported as HF wrote it; every target-specific change happens later, as graph passes. The only thing
added is a thin wrapper that turns the flat KV tensors of the ONNX interface into the cache object HF expects.

Vanilla interface (the convention optimum and onnxruntime-genai use):
inputs ``input_ids[b,s]``, ``attention_mask[b,t]``, ``position_ids[b,s]``, ``past_key_values.{i}.key|value``;
outputs ``logits[b,s,V]``, ``present.{i}.key|value``.
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
from dataclasses import dataclass

import onnx_ir as ir
import torch

from qgraph.errors import QGraphError

log = logging.getLogger(__name__)

# Distinct example sizes so the exporter cannot specialise one dynamic dim onto another.
_EXAMPLE_BATCH, _EXAMPLE_SEQ, _EXAMPLE_PAST = 2, 3, 5


@dataclass(frozen=True)
class KVLayout:
    """Shape facts about the model's KV cache, read from one real forward pass (no per-architecture tables)."""

    num_layers: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype

    def past_names(self) -> list[str]:
        return [f"past_key_values.{i}.{kind}" for i in range(self.num_layers) for kind in ("key", "value")]

    def present_names(self) -> list[str]:
        return [f"present.{i}.{kind}" for i in range(self.num_layers) for kind in ("key", "value")]


def _cache_tensors(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


def probe_kv_layout(model: torch.nn.Module) -> KVLayout:
    """Run the model once and read layer count, KV heads and head size off the cache it returns."""
    with torch.no_grad():
        out = model(input_ids=torch.zeros((1, 2), dtype=torch.long), use_cache=True)
    pairs = _cache_tensors(out.past_key_values)
    key = pairs[0][0]
    if key.dim() != 4:
        raise QGraphError(
            f"KV cache of {type(model).__name__} has rank {key.dim()} (shape {tuple(key.shape)}); qgraph's export "
            "expects [batch, kv_heads, seq, head_dim] per layer"
        )
    return KVLayout(num_layers=len(pairs), kv_heads=key.shape[1], head_dim=key.shape[3], dtype=key.dtype)


class FlatKVDecoder(torch.nn.Module):
    """(input_ids, attention_mask, position_ids, past) -> (logits, *present), with past as a flat tuple."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids, past):
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        for i, layer in enumerate(cache.layers):
            layer.keys, layer.values = past[2 * i], past[2 * i + 1]
            layer.is_initialized = True
            layer.device = input_ids.device
            layer.dtype = past[2 * i].dtype
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
        )
        present = [t for pair in _cache_tensors(out.past_key_values) for t in pair]
        return (out.logits, *present)


def example_inputs(layout: KVLayout) -> tuple:
    b, s, p = _EXAMPLE_BATCH, _EXAMPLE_SEQ, _EXAMPLE_PAST
    input_ids = torch.ones((b, s), dtype=torch.long)
    attention_mask = torch.ones((b, p + s), dtype=torch.long)
    position_ids = torch.arange(p, p + s, dtype=torch.long).unsqueeze(0).expand(b, s).contiguous()
    past = tuple(
        torch.zeros((b, layout.kv_heads, p, layout.head_dim), dtype=layout.dtype) for _ in range(2 * layout.num_layers)
    )
    return input_ids, attention_mask, position_ids, past


def export_vanilla(model: torch.nn.Module, opset: int = 20) -> ir.Model:
    """Export ``model`` (an HF ``*ForCausalLM`` in eval mode) and return the vanilla graph in memory."""
    from torch.export import Dim

    model.eval()
    layout = probe_kv_layout(model)
    batch, seq, past_seq, total_seq = Dim("batch"), Dim("seq_len"), Dim("past_seq_len"), Dim("total_seq_len")
    dynamic_shapes = {
        "input_ids": {0: batch, 1: seq},
        "attention_mask": {0: batch, 1: total_seq},
        "position_ids": {0: batch, 1: seq},
        "past": tuple({0: batch, 2: past_seq} for _ in range(2 * layout.num_layers)),
    }
    names_in = ["input_ids", "attention_mask", "position_ids", *layout.past_names()]
    names_out = ["logits", *layout.present_names()]
    start = time.perf_counter()
    chatter = io.StringIO()
    try:
        with torch.no_grad(), contextlib.redirect_stdout(chatter):
            program = torch.onnx.export(
                FlatKVDecoder(model),
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
            f"torch.onnx.export failed for {type(model).__name__}: {type(exc).__name__}: {str(exc)[:2000]}"
        ) from exc
    log.debug("exporter output:\n%s", chatter.getvalue())
    log.info("exported %s in %.1f s", type(model).__name__, time.perf_counter() - start)
    ir_model = program.model
    ir_model.graph.name = type(model).__name__
    return ir_model

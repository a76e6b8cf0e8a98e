"""Fixtures for pass tests: tiny exported decoders (once per session) and tiny hand-built graphs."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import onnx.version_converter
import onnx_ir as ir
import pytest

from qgraph import QEFFAutoModelForCausalLM
from qgraph.pass_manager import PassSpec, op_histogram, run_pipeline

N_LAYERS = 2  # tests/tiny_models.py
CTX = 32


@pytest.fixture(scope="session")
def exported(tiny_model_dir, cache_dir):
    """``exported(arch)`` -> path of the vanilla export of the tiny ``arch`` model (shared export cache)."""
    paths = {}

    def get(arch: str):
        if arch not in paths:
            qg = QEFFAutoModelForCausalLM.from_pretrained(str(tiny_model_dir(arch)), cache_dir=cache_dir, verbose=False)
            paths[arch] = qg.export()
        return paths[arch]

    return get


@pytest.fixture(scope="session")
def vanilla_model(exported):
    """``vanilla_model(arch)`` -> a fresh in-memory vanilla export."""
    return lambda arch: ir.load(exported(arch))


@pytest.fixture(scope="session")
def retained_model(exported):
    """``retained_model(arch)`` -> a fresh in-memory retained-state graph (``ctx_len`` 32)."""

    def get(arch: str) -> ir.Model:
        model = ir.load(exported(arch))
        run_pipeline(model, [PassSpec("kv-retained-state", {"ctx_len": CTX}), PassSpec("cleanup")])
        return model

    return get


@pytest.fixture(scope="session")
def one_layer_model(tmp_path_factory):
    """``one_layer_model(arch, retained=False)`` -> a fresh export of the tiny ``arch`` model cut to one layer (hidden
    64): the smallest real decoder a pass can be checked on numerically. Retained-state graphs have ``ctx_len`` 32."""
    paths = {}

    def get(arch: str, retained: bool = False) -> ir.Model:
        if arch not in paths:
            import torch
            import transformers

            from qgraph.export import export_vanilla
            from tests.tiny_models import TINY_CONFIGS

            config_name, kwargs = TINY_CONFIGS[arch]
            layers_key = "n_layer" if "n_layer" in kwargs else "num_hidden_layers"
            config = getattr(transformers, config_name)(**{**kwargs, layers_key: 1})
            torch.manual_seed(0)
            model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
            path = tmp_path_factory.mktemp(f"one-layer-{arch}") / "model.onnx"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ir.save(export_vanilla(model), path, external_data="model.onnx.data")
            paths[arch] = path
        model = ir.load(paths[arch])
        if retained:
            run_pipeline(model, [PassSpec("kv-retained-state", {"ctx_len": CTX}), PassSpec("cleanup")])
        return model

    return get


@pytest.fixture(scope="session")
def torchscript_model(tmp_path_factory):
    """``torchscript_model(arch, opset)`` -> a fresh export by the TorchScript exporter (``dynamo=False``): other
    spellings than dynamo's (Cast around norms, ``Div(1, .)``, axes attributes, untyped intermediate values, equal
    weights shared through ``Identity``); above opset 17 exported at 14 (LayerNorm decomposed) and converted by onnx."""
    paths = {}

    def get(arch: str, opset: int = 17) -> ir.Model:
        key = (arch, opset)
        if key not in paths:
            import torch

            from qgraph.export import FlatKVDecoder, example_inputs, probe_kv_layout
            from tests.tiny_models import make_tiny_model

            model = make_tiny_model(arch)
            layout = probe_kv_layout(model)
            path = tmp_path_factory.mktemp(f"torchscript-{arch}") / "model.onnx"
            dynamic = {"input_ids": {0: "b", 1: "s"}, "attention_mask": {0: "b", 1: "t"}}
            dynamic |= {"position_ids": {0: "b", 1: "s"}} | {n: {0: "b", 2: "p"} for n in layout.past_names()}
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    FlatKVDecoder(model),
                    example_inputs(layout),
                    str(path),
                    dynamo=False,
                    opset_version=opset if opset <= 17 else 14,
                    input_names=layout.input_names(),
                    output_names=["logits", *layout.present_names()],
                    dynamic_axes=dynamic,
                )
            if opset > 17:
                onnx.save(onnx.version_converter.convert_version(onnx.load(str(path)), opset), str(path))
            paths[key] = path
        return ir.load(paths[key])

    return get


def parse(text: str, **initializers: np.ndarray) -> ir.Model:
    """A model from ONNX text syntax, with numpy initializers added by name."""
    proto = onnx.parser.parse_model(text)
    proto.graph.initializer.extend(
        onnx.numpy_helper.from_array(np.asarray(a), name) for name, a in initializers.items()
    )
    return ir.from_proto(proto)


def parse_edited(text: str, edits=(), renames=None) -> ir.Model:
    """``parse(text)`` after each ``(old, new)`` text edit (``old`` must occur); then graph inputs and outputs renamed
    by ``renames`` (ONNX text allows no dots in names, the contract's buffer names have them)."""
    for old, new in edits:
        assert old in text, old
        text = text.replace(old, new)
    model = parse(text)
    for value in [*model.graph.inputs, *model.graph.outputs]:
        value.name = (renames or {}).get(value.name, value.name)
    return model


def assert_refused(graph_pass, model: ir.Model, candidate: str, reason: str):
    """Run ``graph_pass``: one candidate (a ``candidate`` node) refused with ``reason`` in its miss, graph unchanged."""
    hist = op_histogram(model)
    result = graph_pass(model)
    [miss] = result.misses
    assert miss.startswith(f"{candidate} ") and reason in miss, miss
    assert op_histogram(model) == hist and not result.modified
    return result


def copy(model: ir.Model) -> ir.Model:
    """An independent graph sharing the (immutable) tensors, external data included."""
    return model.clone()


def run_twice(graph_pass, model: ir.Model):
    """Run a pass, then again: the second run must report no change and leave the graph as it was."""
    first = graph_pass(model)
    hist = op_histogram(model)
    proto = ir.to_proto(model).SerializeToString()
    again = graph_pass(model)
    assert not again.modified, f"second run reported changes: {getattr(again, 'counts', {})}"
    assert op_histogram(model) == hist
    assert ir.to_proto(model).SerializeToString() == proto
    return first

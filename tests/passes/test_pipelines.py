"""standard_pipeline chooses passes from declared capabilities: never from a backend's name."""

from __future__ import annotations

import dataclasses

import pytest

from qgraph.backend_api import Capabilities, CompileOptions, Kernel
from qgraph.backends.ai100_rmsnorm import CUSTOM_RMSNORM
from qgraph.errors import QGraphError
from qgraph.pipelines import QUANTIZATION_DEFAULTS, standard_pipeline

FLOATS = frozenset({"float32", "float16"})
ORT_KERNELS = frozenset(
    {Kernel("", "SimplifiedLayerNormalization", FLOATS)}
    | {
        Kernel("com.microsoft", op, FLOATS)
        for op in ("FastGelu", "Gelu", "SkipLayerNormalization", "SkipSimplifiedLayerNormalization")
        + ("RotaryEmbedding", "GroupQueryAttention", "MatMulNBits", "GatherBlockQuantized")
    }
)
ORT_LIKE = Capabilities(
    retained_state=True,
    dtypes=frozenset({"float32", "float16", "int8", "int4"}),
    kernels=ORT_KERNELS,
    runs_node_by_node=True,
)
AI100_LIKE = Capabilities(
    retained_state=True,
    static_shapes=True,
    dtypes=frozenset({"float16", "mxfp6"}),
    kernels=frozenset({Kernel(*CUSTOM_RMSNORM.op, FLOATS)}),
)
PLAIN = Capabilities(retained_state=False, dtypes=frozenset({"float32"}))


def _names(capabilities, offered=(), **options):
    return [(s.name, dict(s.options)) for s in standard_pipeline(capabilities, CompileOptions(**options), offered)]


def test_ort_like_target_gets_its_fused_kernels_and_the_speed_rewrites():
    assert _names(ORT_LIKE, ctx_len=64) == [
        ("kv-retained-state", {"ctx_len": 64}),
        ("rmsnorm-fuse", {"lowering": "ort-fused"}),
        ("layernorm-gelu", {"gelu": "com.microsoft"}),
        ("skip-norm", {}),
        ("grouped-query-matmul", {}),
        ("merge-parallel-matmuls", {}),
        ("shared-head-transpose", {}),
        ("rotary-embedding", {}),
        ("group-query-attention", {}),
        ("last-token-logits", {}),
        ("cleanup", {}),
    ]


@pytest.mark.parametrize(("precision", "bits"), [("int8", 8), ("int4", 4)])
def test_a_weight_only_precision_quantizes_after_the_matmuls_are_merged(precision, bits):
    names = _names(ORT_LIKE, precision=precision)
    quantize = ("quantize-weights", QUANTIZATION_DEFAULTS[precision])
    assert QUANTIZATION_DEFAULTS[precision]["bits"] == bits
    assert names[-2:] == [quantize, ("cleanup", {})]
    assert names.index(("merge-parallel-matmuls", {})) < names.index(quantize)


def test_quantization_options_override_the_precisions_defaults():
    names = dict(_names(ORT_LIKE, precision="int4", quantization={"head_bits": 4, "block_size": 64}))
    assert names["quantize-weights"] == QUANTIZATION_DEFAULTS["int4"] | {"head_bits": 4, "block_size": 64}


@pytest.mark.parametrize(
    ("precision", "quantization", "message"),
    [
        ("float32", {"head_bits": 4}, r"apply to precision 'int8' or 'int4' only, not 'float32'"),
        ("int4", {"bits": 8}, r"bits=8 contradicts precision 'int4'"),
        ("int4", {"head_bits": 3}, r"not valid: head_bits must be 4 or 8, got 3"),
        ("int8", {"colour": "blue"}, r"not valid: .*colour"),
    ],
)
def test_bad_quantization_options_are_refused_naming_the_fix(precision, quantization, message):
    with pytest.raises(QGraphError, match=message):
        _names(ORT_LIKE, precision=precision, quantization=quantization)


def test_a_precision_the_target_does_not_declare_is_refused_with_the_ones_it_accepts():
    with pytest.raises(QGraphError, match=r"precision 'int4' is not supported.*float16, float32, mxfp6"):
        _names(AI100_LIKE, precision="int4")


def test_float16_on_a_target_that_runs_the_graphs_types_clips_and_converts():
    names = [n for n, _ in _names(ORT_LIKE, precision="float16")]
    assert names[-3:] == ["fp16-clip", "fp16-convert", "cleanup"]


def test_a_float16_only_target_gets_a_clipped_float32_graph_and_the_rmsnorm_it_offers():
    names = _names(AI100_LIKE, offered=[CUSTOM_RMSNORM])
    assert ("rmsnorm-fuse", {"lowering": CUSTOM_RMSNORM}) in names
    # a target with its own graph compiler gets no speed rewrites (it fuses for itself), only the contract passes
    assert [n for n, _ in names] == ["kv-retained-state", "rmsnorm-fuse", "last-token-logits", "fp16-clip", "cleanup"]


def test_a_target_without_fused_norms_or_state_gets_cleanup_only():
    assert _names(PLAIN) == [("cleanup", {})]


@pytest.mark.parametrize(
    ("providers", "precision", "fused"),
    [
        (None, "float32", True),
        (["CPUExecutionProvider"], "int4", True),
        (["CUDAExecutionProvider", "CPUExecutionProvider"], "float16", True),
        (["CUDAExecutionProvider", "CPUExecutionProvider"], "float32", False),  # CUDA's GQA: float16/bfloat16 only
        (["CUDAExecutionProvider", "CPUExecutionProvider"], "int8", False),  # float32 activations
        (["SomeOtherExecutionProvider"], "float32", False),  # no kernel known: attention stays standard ops
    ],
)
def test_ort_fuses_attention_only_where_its_first_provider_has_the_kernel(providers, precision, fused):
    from qgraph.backends.ort import OrtBackend

    extra = {"providers": providers} if providers else {}
    options = CompileOptions(precision=precision, extra=extra)
    names = [s.name for s in OrtBackend().pipeline(options)]
    assert ("group-query-attention" in names) == fused


def test_a_pass_is_given_only_to_targets_that_execute_what_it_writes():
    without_rotary = dataclasses.replace(
        ORT_LIKE, kernels=frozenset(k for k in ORT_KERNELS if k.op_type != "RotaryEmbedding")
    )
    names = [n for n, _ in _names(without_rotary)]
    assert "rotary-embedding" not in names and "group-query-attention" in names
    float32_gqa_only = dataclasses.replace(
        ORT_LIKE,
        kernels=frozenset(k for k in ORT_KERNELS if k.op_type != "GroupQueryAttention")
        | {Kernel("com.microsoft", "GroupQueryAttention", frozenset({"float32"}))},
    )
    assert "group-query-attention" in [n for n, _ in _names(float32_gqa_only)]
    assert "group-query-attention" not in [n for n, _ in _names(float32_gqa_only, precision="float16")]


def test_an_offered_lowering_the_target_does_not_execute_is_passed_over():
    assert ("rmsnorm-fuse", {"lowering": "ort-fused"}) in _names(ORT_LIKE, offered=[CUSTOM_RMSNORM])


def test_capabilities_are_facts_no_field_names_a_pass_or_a_policy():
    from qgraph.registry import pass_registry

    fields = {f.name for f in dataclasses.fields(Capabilities)}
    assert fields == {
        "retained_state",
        "dtypes",
        "kernels",
        "runs_node_by_node",
        "static_shapes",
        "continuous_batching",
    }
    words = [name.replace("-", "_") for name in pass_registry().names()] + ["rmsnorm", "lowering", "speedups"]
    assert not [(f, w) for f in fields for w in words if w in f]


@pytest.mark.parametrize("backend_name", ["ort", "ai100"])
def test_no_backend_edits_the_standard_pipeline_by_pass_name(backend_name):
    """A built-in backend's pipeline is the standard one for its capabilities: nothing removed or added by name."""
    import inspect

    from qgraph.registry import backend_registry

    backend = backend_registry().get(backend_name)
    source = inspect.getsource(inspect.getmodule(backend))
    assert ".name !=" not in source and ".name ==" not in source
    names = [s.name for s in backend().pipeline(CompileOptions())]
    assert names == [s.name for s in standard_pipeline(backend.capabilities, CompileOptions(), [CUSTOM_RMSNORM])]


def test_passes_name_no_qualcomm_specific_op_domain_or_tool():
    """Target-specific lowerings live with their target: the CustomRMSNorm function is in the AI100 package."""
    from pathlib import Path

    import qgraph.passes

    names = ("qti", "qualcomm", "ai100", "ai 100", "customrmsnorm", "qaic", "qpc")
    found = {
        path.name: word
        for path in Path(qgraph.passes.__path__[0]).rglob("*.py")
        for word in names
        if word in path.read_text().lower()
    }
    assert found == {}

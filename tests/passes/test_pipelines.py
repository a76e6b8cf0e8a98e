"""standard_pipeline chooses passes from declared capabilities: never from a backend's name."""

from __future__ import annotations

import pytest

from qgraph.backend_api import Capabilities, CompileOptions
from qgraph.errors import QGraphError
from qgraph.pipelines import standard_pipeline

ORT_LIKE = Capabilities(
    static_shapes=False,
    retained_state=True,
    rmsnorm_lowering="ort-fused",
    dtypes=frozenset({"float32", "float16", "int8", "int4"}),
    domains=frozenset({"", "com.microsoft"}),
    graph_speedups=True,
)
AI100_LIKE = Capabilities(
    static_shapes=True,
    retained_state=True,
    rmsnorm_lowering="function",
    dtypes=frozenset({"float16", "mxfp6"}),
    domains=frozenset({"", "com.qti.aisw.onnx"}),
    custom_functions=frozenset({"CustomRMSNorm"}),
)
PLAIN = Capabilities(
    static_shapes=False, retained_state=False, rmsnorm_lowering="decomposed", dtypes=frozenset({"float32"})
)


def _names(capabilities, **options):
    return [(s.name, dict(s.options)) for s in standard_pipeline(capabilities, CompileOptions(**options))]


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
    assert names[-2:] == [("quantize-weights", {"bits": bits}), ("cleanup", {})]
    assert names.index(("merge-parallel-matmuls", {})) < names.index(("quantize-weights", {"bits": bits}))


def test_a_precision_the_target_does_not_declare_is_refused_with_the_ones_it_accepts():
    with pytest.raises(QGraphError, match=r"precision 'int4' is not supported.*float16, float32, mxfp6"):
        _names(AI100_LIKE, precision="int4")


def test_float16_on_a_target_that_runs_the_graphs_types_clips_and_converts():
    names = [n for n, _ in _names(ORT_LIKE, precision="float16")]
    assert names[-3:] == ["fp16-clip", "fp16-convert", "cleanup"]


def test_a_float16_only_target_gets_a_clipped_float32_graph_and_the_function_rmsnorm():
    names = _names(AI100_LIKE)
    assert ("rmsnorm-fuse", {"lowering": "function"}) in names
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

"""standard_pipeline chooses passes from declared capabilities: never from a backend's name."""

from __future__ import annotations

from qgraph.backend_api import Capabilities, CompileOptions
from qgraph.pipelines import standard_pipeline

ORT_LIKE = Capabilities(
    static_shapes=False,
    retained_state=True,
    rmsnorm_lowering="ort-fused",
    dtypes=frozenset({"float32", "float16"}),
    domains=frozenset({"", "com.microsoft"}),
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


def test_ort_like_target_gets_its_fused_kernels():
    assert _names(ORT_LIKE, ctx_len=64) == [
        ("kv-retained-state", {"ctx_len": 64}),
        ("rmsnorm-fuse", {"lowering": "ort-fused"}),
        ("layernorm-gelu", {"gelu": "com.microsoft"}),
        ("cleanup", {}),
    ]


def test_float16_on_a_target_that_runs_the_graphs_types_clips_and_converts():
    names = [n for n, _ in _names(ORT_LIKE, precision="float16")]
    assert names[-3:] == ["fp16-clip", "fp16-convert", "cleanup"]


def test_a_float16_only_target_gets_a_clipped_float32_graph_and_the_function_rmsnorm():
    names = _names(AI100_LIKE)
    assert ("rmsnorm-fuse", {"lowering": "function"}) in names
    assert [n for n, _ in names] == ["kv-retained-state", "rmsnorm-fuse", "fp16-clip", "cleanup"]


def test_a_target_without_fused_norms_or_state_gets_cleanup_only():
    assert _names(PLAIN) == [("cleanup", {})]

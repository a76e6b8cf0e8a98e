"""Default pass pipelines, chosen from a backend's declared capabilities (data), never from its name."""

from __future__ import annotations

from typing import TYPE_CHECKING

from qgraph.errors import QGraphError
from qgraph.pipeline_spec import PassSpec

QUANTIZED_BITS = {"int8": 8, "int4": 4}  # weight-only precisions -> quantize-weights bits

if TYPE_CHECKING:
    from qgraph.backend_api import Capabilities, CompileOptions


def standard_pipeline(capabilities: Capabilities, options: CompileOptions) -> list[PassSpec]:
    """The passes that make a vanilla export ready for a target, each chosen from what the target declares.

    - ``kv-retained-state`` for targets that keep the KV cache on the device (``retained_state``), then, with
      ``full_batch_size`` on a static-shape target (which cannot run one row of its buffers alone),
      ``kv-batch-index``: QEfficient's ``batch_index`` input selecting the KV slots a run uses;
    - ``rmsnorm-fuse`` lowered as the target executes RMSNorm (``rmsnorm_lowering``; none for ``"decomposed"``);
    - ``layernorm-gelu`` with ORT's fused Gelu kernels, then ``skip-norm`` (residual Add + norm as one kernel), where
      the target executes the ``com.microsoft`` domain;
    - for targets that run the graph as written (``graph_speedups``; a target with its own graph compiler fuses for
      itself): ``grouped-query-matmul``, ``merge-parallel-matmuls``, ``shared-head-transpose`` (standard ops),
      ``rotary-embedding`` where the target executes ``com.microsoft``, then ``group-query-attention`` (its fused
      attention kernel, which updates the retained state itself) on retained-state targets;
    - ``last-token-logits`` on retained-state targets: prefill projects only each row's last token on the vocabulary;
    - ``quantize-weights`` for ``precision`` ``"int8"`` / ``"int4"`` (weight-only, ``MatMulNBits``);
    - ``fp16-clip`` where the target computes in float16: asked for (``precision="float16"``), or a target without
      float32 (its compiler converts a float32 graph itself, e.g. Cloud AI 100's ``-convert-to-fp16``);
    - ``fp16-convert`` where float16 is asked for and the target runs the graph's own types (it accepts float32 too,
      so nothing else would convert);
    - ``cleanup`` last.

    ``precision`` must be one the target declares (``dtypes``) or ``"float32"``, the export's own type.
    """
    accepted = capabilities.dtypes | {"float32"}
    if options.precision not in accepted:
        raise QGraphError(
            f"precision {options.precision!r} is not supported by this backend; "
            f"it accepts: {', '.join(sorted(accepted))}"
        )
    microsoft = "com.microsoft" in capabilities.domains
    specs = []
    if capabilities.retained_state:
        specs.append(PassSpec("kv-retained-state", {"ctx_len": options.ctx_len}))
    if options.full_batch_size and capabilities.retained_state and capabilities.static_shapes:
        specs.append(PassSpec("kv-batch-index"))
    if capabilities.rmsnorm_lowering != "decomposed":
        specs.append(PassSpec("rmsnorm-fuse", {"lowering": capabilities.rmsnorm_lowering}))
    if microsoft:
        specs += [PassSpec("layernorm-gelu", {"gelu": "com.microsoft"}), PassSpec("skip-norm")]
    if capabilities.graph_speedups:
        specs += [PassSpec(n) for n in ("grouped-query-matmul", "merge-parallel-matmuls", "shared-head-transpose")]
        if microsoft:
            specs.append(PassSpec("rotary-embedding"))
        if microsoft and capabilities.retained_state:
            specs.append(PassSpec("group-query-attention"))
    if capabilities.retained_state:
        specs.append(PassSpec("last-token-logits"))
    if options.precision in QUANTIZED_BITS:
        specs.append(PassSpec("quantize-weights", {"bits": QUANTIZED_BITS[options.precision]}))
    float16 = options.precision == "float16"
    if float16 or "float32" not in capabilities.dtypes:
        specs.append(PassSpec("fp16-clip"))
    if float16 and "float32" in capabilities.dtypes:
        specs.append(PassSpec("fp16-convert"))
    specs.append(PassSpec("cleanup"))
    return specs

"""Default pass pipelines, derived from what a target executes and what each pass writes; never from a name."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from qgraph.errors import QGraphError
from qgraph.pipeline_spec import PassSpec
from qgraph.registry import Registry, pass_registry

QUANTIZED_BITS = {"int8": 8, "int4": 4}  # weight-only precisions -> quantize-weights bits
# quantize-weights options of compile(precision=...), chosen by measurement (benchmarks/quant_sweep.py, README);
# compile(quantization={...}) overrides any of them
QUANTIZATION_DEFAULTS: dict[str, dict[str, Any]] = {
    "int8": {"bits": 8, "block_size": 32, "symmetric": False, "accuracy_level": 4, "head_bits": 8, "algorithm": "rtn"},
    "int4": {
        "bits": 4,
        "block_size": 32,
        "symmetric": False,
        "accuracy_level": 4,
        "head_bits": 4,
        "algorithm": "auto",  # exact float zero points for weights already on 4-bit grids, round-to-nearest elsewhere
        "float_zero_points": "split",
    },
}

if TYPE_CHECKING:
    from qgraph.backend_api import Capabilities, CompileOptions


# RMSNorm lowerings every runtime may have, in order of preference; a backend's own come first (``offered``).
BUILTIN_RMSNORM_LOWERINGS = ("ort-fused", "onnx-23")
ORT_CONTRIB_DOMAIN = "com.microsoft"  # the Gelu form layernorm-gelu writes where the target has ORT's kernels


def standard_pipeline(
    capabilities: Capabilities,
    options: CompileOptions,
    offered: Sequence[Any] = (),
    registry: Registry | None = None,
) -> list[PassSpec]:
    """The passes that make a vanilla export ready for a target, derived from what the target executes
    (``capabilities``) and what each pass declares it writes (``GraphPass.emitted``): a pass that writes an op beyond
    standard ONNX is given only to a target with a kernel for that op on the graph's activation type.

    - ``kv-retained-state`` for targets that keep the KV cache on the device (``retained_state``), then, with
      ``full_batch_size`` on a static-shape target (which cannot run one row of its buffers alone),
      ``kv-batch-index``: QEfficient's ``batch_index`` input selecting the KV slots a run uses;
    - ``rmsnorm-fuse`` with the first lowering the target executes: those it ``offered`` (its own ops, e.g. a
      function-backed custom op), then the built-in ones; none if it executes none;
    - ``layernorm-gelu`` with ORT's Gelu kernels, then ``skip-norm`` (residual Add + norm as one kernel);
    - for targets that run the graph node by node (``runs_node_by_node``; a compiling target fuses for itself):
      ``grouped-query-matmul``, ``merge-parallel-matmuls``, ``shared-head-transpose`` (standard ops),
      ``rotary-embedding``, then ``group-query-attention`` (a fused attention that updates the retained state itself)
      on retained-state targets;
    - ``last-token-logits`` on retained-state targets: prefill projects only each row's last token on the vocabulary
      (with ``num_speculative_tokens=k``, the last ``k + 1``: a verification run reads them all);
    - ``quantize-weights`` for ``precision`` ``"int8"`` / ``"int4"`` (weight-only, ``MatMulNBits``) with the
      options of ``quantization_options``;
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
    registry = registry or pass_registry()
    activations = "float16" if options.precision == "float16" else "float32"

    def executable(name: str, **pass_options: Any) -> PassSpec | None:
        """``PassSpec(name, pass_options)`` when the target executes every op the pass writes with those options."""
        writes = registry.get(name).emitted(pass_options)
        if all(capabilities.executes(domain, op, activations) for domain, op in writes):
            return PassSpec(name, pass_options)
        return None

    specs: list[PassSpec | None] = []
    if capabilities.retained_state:
        specs.append(PassSpec("kv-retained-state", {"ctx_len": options.ctx_len}))
    if options.full_batch_size and capabilities.retained_state and capabilities.static_shapes:
        specs.append(PassSpec("kv-batch-index"))
    lowerings = (executable("rmsnorm-fuse", lowering=lowering) for lowering in (*offered, *BUILTIN_RMSNORM_LOWERINGS))
    specs += [next(filter(None, lowerings), None)]
    specs += [executable("layernorm-gelu", gelu=ORT_CONTRIB_DOMAIN), executable("skip-norm")]
    if capabilities.runs_node_by_node:
        specs += [PassSpec(n) for n in ("grouped-query-matmul", "merge-parallel-matmuls", "shared-head-transpose")]
        specs.append(executable("rotary-embedding"))
        if capabilities.retained_state:
            specs.append(executable("group-query-attention"))
    specs = [s for s in specs if s is not None]  # the passes whose ops the target does not execute
    if capabilities.retained_state:
        width = options.verification_width
        specs.append(PassSpec("last-token-logits", {"positions": width} if width > 1 else {}))
    if options.precision in QUANTIZED_BITS:
        specs.append(PassSpec("quantize-weights", quantization_options(options, registry)))
    elif options.quantization:
        raise QGraphError(
            f"quantization options apply to precision 'int8' or 'int4' only, not {options.precision!r}: drop them or "
            "compile with one of those precisions"
        )
    float16 = options.precision == "float16"
    if float16 or "float32" not in capabilities.dtypes:
        specs.append(PassSpec("fp16-clip"))
    if float16 and "float32" in capabilities.dtypes:
        specs.append(PassSpec("fp16-convert"))
    specs.append(PassSpec("cleanup"))
    return specs


def quantization_options(options: CompileOptions, registry: Registry | None = None) -> dict[str, Any]:
    """The quantize-weights options of ``options.precision``: its measured defaults (``QUANTIZATION_DEFAULTS``)
    updated by ``options.quantization``; an unknown option or a bad value fails here, before any export."""
    chosen = dict(QUANTIZATION_DEFAULTS[options.precision]) | dict(options.quantization or {})
    if chosen["bits"] != QUANTIZED_BITS[options.precision]:
        raise QGraphError(
            f"quantization bits={chosen['bits']!r} contradicts precision {options.precision!r}: drop 'bits' (the "
            "precision sets it) or choose the other precision"
        )
    cls = (registry or pass_registry()).get("quantize-weights")
    try:
        cls(**chosen)
    except (TypeError, ValueError) as exc:
        raise QGraphError(f"quantization options {dict(options.quantization or {})} are not valid: {exc}") from exc
    return chosen

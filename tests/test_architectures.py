"""Architecture breadth: the same export and the same passes serve every decoder transformers ships in scope.

Each architecture is a tiny seeded random model built from its transformers config (``tests/tiny_models.py``),
exported unmodified and rewritten by the registered passes; qgraph's greedy tokens must equal HF transformers'
``generate(do_sample=False)`` exactly, through every backend (the Cloud AI 100 leg runs the bundle's graph on ONNX
Runtime). What a model needs beyond that is a general mechanism in the export or the passes, never a model branch:
``test_passes_name_no_model`` holds the passes to it. Architectures that cannot be supported must fail at export or
at the KV pass with a message naming what is missing.

One export per architecture is shared by all its cases. ``python -m tests.support_matrix`` runs this module and turns
what it records into ``docs/support_matrix.md``.
"""

from __future__ import annotations

import ast
import importlib.util
import io
import re
import time
import tokenize
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx_ir.passes import PreconditionError

from qgraph import QEFFAutoModelForCausalLM
from qgraph.errors import QGraphError
from qgraph.export import probe_kv_layout
from qgraph.graph_utils import const
from qgraph.passes.kv_retained_state import classify_attention_terms
from qgraph.runtime import greedy_generate
from tests.bundle_on_ort import bundle_session
from tests.parity import LONG_PROMPT, MY_NAME, NEW_TOKENS, hf_greedy
from tests.support_matrix import describe, record
from tests.tiny_models import SLIDING_WINDOW, TINY_CONFIGS, make_tiny_model

ROOT = Path(__file__).resolve().parents[1]

# The list: each must match HF exactly.
REQUIRED = [
    "gpt2",
    "llama",
    "mistral",
    "mixtral",
    "qwen2",
    "qwen3",
    "phi3",
    "gemma",
    "gemma2",
    "gpt_neox",
    "gptj",
    "opt",
    "falcon",
    "gpt_bigcode",
    "starcoder2",
    "granite",
    "olmo",
    "stablelm",
    "bloom",
    "codegen",
]
# What else transformers ships that works with no model-specific code (run with the slow tests).
EXTRA = [
    "phi",
    "persimmon",
    "qwen2_moe",
    "qwen3_moe",
    "olmo2",
    "olmoe",
    "granitemoe",
    "gemma3_text",
    "cohere",
    "cohere2",
    "gpt_neo",
    "nemotron",
    "helium",
    "glm",
    "smollm3",
    "ministral",
    "arcee",
    "exaone4",
    "apertus",
    "ernie4_5",
    "seed_oss",
    "hunyuan_v1_dense",
]
# Not supported: the error must name what is missing (a regular expression over the message).
UNSUPPORTED = {
    "jamba": r"KV cache layer 0 of JambaForCausalLM \(LinearAttentionLayer\) holds keys NoneType",
    "llama4_text": r"torch\.onnx\.export failed .*complex-valued",
    "mpt": r"torch\.onnx\.export failed .*inconsisten",
    "falcon_alibi": r"could not compute the attention-mask values .*Mul",
    "llama_bidirectional": r"no causal attention mask: .*attends bidirectionally",
}
FAST_FAILURES = ("jamba", "llama_bidirectional")  # one at the export's cache probe, one at the KV pass
assert set(REQUIRED) | set(EXTRA) | set(UNSUPPORTED) == set(TINY_CONFIGS), "every tiny config has its place here"

BACKENDS = ["ort"] + (["ai100"] if importlib.util.find_spec("qgraph.backends.ai100") else [])
PREFILL, CTX = 12, 64  # the long prompt (17 tokens) is prefilled in two chunks; the window (12) cuts inside them
CASES = {"my-name-is": (1, [MY_NAME]), "batch-of-two": (2, [MY_NAME, LONG_PROMPT])}

RESULTS: dict[str, dict] = {}


def _slow(arch: str):
    return pytest.param(arch, marks=pytest.mark.slow) if arch in EXTRA else arch


@pytest.fixture(scope="module", autouse=True)
def support_record():
    """Everything the tests saw, per architecture; written out for the support matrix when asked."""
    yield RESULTS
    record(RESULTS)


@pytest.fixture(scope="module")
def arch_model(cache_dir):
    """``arch_model(arch)`` -> the ``QEFFAutoModelForCausalLM`` with its vanilla export done (once per arch)."""
    made: dict[str, QEFFAutoModelForCausalLM] = {}

    def get(arch: str) -> QEFFAutoModelForCausalLM:
        if arch not in made:
            model = QEFFAutoModelForCausalLM(make_tiny_model(arch), cache_dir=cache_dir, verbose=False)
            row = RESULTS.setdefault(arch, {"group": "required" if arch in REQUIRED else "extra"})
            row["hf_class"] = type(model.model).__name__
            start = time.perf_counter()
            try:
                model.export()
            except QGraphError as exc:
                row.update(export="failed", stage="export", error=str(exc))
                raise
            row.update(export="ok", export_s=round(time.perf_counter() - start, 1))
            layout = probe_kv_layout(model.model)
            row["features"] = describe(model.model, layout.kv_heads, layout.takes_positions)
            made[arch] = model
        return made[arch]

    return get


@pytest.fixture(scope="module")
def hf_tokens(tokenizer):
    """``hf_tokens(model, prompt)`` -> HF transformers' greedy tokens (computed once per model and prompt)."""
    done: dict[tuple[int, str], list[int]] = {}

    def get(model, prompt: str) -> list[int]:
        key = (id(model), prompt)
        if key not in done:
            done[key] = hf_greedy(model, tokenizer, prompt)
        return done[key]

    return get


def generate(model: QEFFAutoModelForCausalLM, backend: str, batch_size: int, prompts, tokenizer, tmp_path):
    """Greedy tokens for ``prompts`` through ``backend``: its own session, or (ai100) the bundle's graph on ORT."""
    directory = model.compile(backend=backend, prefill_seq_len=PREFILL, ctx_len=CTX, batch_size=batch_size)
    if backend != "ai100":
        return model.generate(tokenizer, prompts, generation_len=NEW_TOKENS, verbose=False).generated_ids
    eos = {int(model.model.generation_config.eos_token_id)}
    prompt_ids = [tokenizer(p)["input_ids"] for p in prompts]
    session = bundle_session(directory, tmp_path)
    return greedy_generate(session, prompt_ids, batch_size, NEW_TOKENS, eos, tokenizer.pad_token_id or 0)[0]


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", [_slow(a) for a in REQUIRED + EXTRA])
def test_greedy_tokens_equal_transformers(arch, backend, case, arch_model, hf_tokens, tokenizer, tmp_path):
    model = arch_model(arch)
    batch_size, prompts = CASES[case]
    row = RESULTS[arch]
    try:
        generated = generate(model, backend, batch_size, prompts, tokenizer, tmp_path)
    except QGraphError as exc:
        row.update(stage=f"{backend} compile/generate", error=str(exc))
        raise
    if backend == "ort":
        row["passes"] = [{"name": r["name"], "counts": r["counts"]} for r in model.artifact.reports]
    expected = [hf_tokens(model.model, p) for p in prompts]
    row.setdefault("parity", {}).setdefault(backend, {})[case] = generated == expected
    assert generated == expected


@pytest.mark.parametrize(
    "arch", [a if a in FAST_FAILURES else pytest.param(a, marks=pytest.mark.slow) for a in UNSUPPORTED]
)
def test_unsupported_architecture_fails_naming_what_is_missing(arch, arch_model):
    row = RESULTS.setdefault(arch, {"group": "unsupported"})
    with pytest.raises(QGraphError) as failure:
        arch_model(arch).compile(backend="ort", prefill_seq_len=PREFILL, ctx_len=CTX, batch_size=1)
    message = " ".join(str(failure.value).split())
    row.setdefault("stage", "kv-retained-state pass" if "pass 'kv-retained-state'" in message else "export")
    row["error"] = message[:400]
    assert re.search(UNSUPPORTED[arch], message), message


# -- the mechanisms, checked on the graph --------------------------------------------------------------------------


def _kv_counts(model: QEFFAutoModelForCausalLM, ctx_len: int = CTX) -> dict[str, int]:
    model.compile(backend="ort", prefill_seq_len=PREFILL, ctx_len=ctx_len, batch_size=1)
    return next(r["counts"] for r in model.artifact.reports if r["name"] == "kv-retained-state")


@pytest.mark.parametrize("arch, sliding", [("mistral", 1), ("gemma2", 1), ("starcoder2", 1), ("llama", 0)])
def test_sliding_window_is_measured_off_the_graph(arch, sliding, arch_model):
    counts = _kv_counts(arch_model(arch))
    assert counts["windowed_masks"] == sliding
    assert counts.get("window") == (SLIDING_WINDOW if sliding else None)


def test_a_window_no_shorter_than_ctx_len_is_plain_causal(arch_model):
    counts = _kv_counts(arch_model("mistral"), ctx_len=SLIDING_WINDOW)
    assert counts["windowed_masks"] == 0


def test_alibi_from_attention_mask_is_kept_as_a_per_key_bias(arch_model):
    counts = _kv_counts(arch_model("bloom"))
    assert counts["key_biases"] == 1 and counts["attention_mask_as_ones"] > 0


def test_position_ids_input_is_added_for_models_without_it(arch_model):
    model = arch_model("bloom")
    model.compile(backend="ort", prefill_seq_len=PREFILL, ctx_len=CTX, batch_size=1)
    names = [i.name for i in onnx.load(str(model.onnx_path), load_external_data=False).graph.input]
    assert names[:2] == ["input_ids", "position_ids"] and "attention_mask" not in names


# -- the passes stay model-agnostic -------------------------------------------------------------------------------

MODEL_NAMES = re.compile(
    r"gpt-?2|gpt_?neox?|gpt-?j|llama|mistral|mixtral|qwen|phi-?3|gemma|falcon|bigcode|starcoder|granite|olmo|"
    r"stablelm|bloom|codegen|cohere|persimmon|nemotron|helium|smollm|exaone|ministral|arcee|apertus|ernie|hunyuan|"
    r"jamba|\bopt\b|\bphi\b|\bglm\b|\bmpt\b",
    re.IGNORECASE,
)


def _code_without_docstrings_and_comments(path: Path) -> str:
    source = path.read_text()
    docstrings = set()
    for node in ast.walk(ast.parse(source)):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
            value = body[0].value
            if isinstance(value, ast.Constant) and isinstance(value.value, str):
                docstrings.add((value.lineno, value.col_offset))
    kept = []
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT or (token.type == tokenize.STRING and token.start in docstrings):
            continue
        kept.append(token.string)
    return " ".join(kept)


@pytest.mark.parametrize("path", sorted((ROOT / "passes").glob("*.py")), ids=lambda p: p.name)
def test_passes_name_no_model(path):
    found = sorted({m.group(0) for m in MODEL_NAMES.finditer(_code_without_docstrings_and_comments(path))})
    assert not found, f"{path.name} names models outside docstrings and comments: {found}"


# -- the mask measurement, on hand-made graphs (no export) ---------------------------------------------------------

PROBE_CTX = 16


def _graph_with_term(pattern):
    """A graph whose one value ``term`` is ``pattern`` (a [1, 1, 2, PROBE_CTX] array for the probe's two queries at
    positions 14, 15) gated by ``attention_mask``, so it is computed from attention_mask like a real mask."""
    mask = ir.Value(name="attention_mask", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape(["b", "t"]))
    ids = ir.Value(name="input_ids", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape(["b", "s"]))
    axes = const([1, 2], np.int64)
    pattern = np.asarray(pattern)
    table = const(pattern)
    if pattern.dtype == np.bool_:
        gate = ir.node("Cast", [mask], attributes={"to": ir.DataType.BOOL})
        wide = ir.node("Unsqueeze", [gate.outputs[0], axes.outputs[0]])
        term = ir.node("And", [wide.outputs[0], table.outputs[0]])
    else:
        gate = ir.node("Cast", [mask], attributes={"to": ir.DataType.FLOAT})
        wide = ir.node("Unsqueeze", [gate.outputs[0], axes.outputs[0]])
        term = ir.node("Mul", [wide.outputs[0], table.outputs[0]])
    nodes = [axes, table, gate, wide, term]
    graph = ir.Graph([ids, mask], [term.outputs[0]], nodes=nodes, opset_imports={"": 20})
    return ir.Model(graph, ir_version=10), term.outputs[0]


def _visible(window=None, chunk=None):
    keys = np.arange(PROBE_CTX)
    rows = []
    for q in (PROBE_CTX - 2, PROBE_CTX - 1):
        row = keys <= q
        if window:
            row &= keys > q - window
        if chunk:
            row &= keys // chunk == q // chunk
        rows.append(row)
    return np.array(rows)[None, None]


def _additive(visible):
    return np.where(visible, 0.0, np.finfo(np.float32).min).astype(np.float32)


def _per_key_bias():
    return (np.arange(PROBE_CTX, dtype=np.float32) * -0.5)[None, None, None].repeat(2, axis=2)


@pytest.mark.parametrize(
    "make, kind, window",
    [
        (lambda: _visible(), "mask", None),
        (lambda: _visible(window=5), "mask", 5),
        (lambda: _visible(window=PROBE_CTX), "mask", None),  # a window the buffer never exceeds is plain causal
        (lambda: _additive(_visible(window=3)), "mask", 3),
        (_per_key_bias, "key_bias", None),
    ],
    ids=["causal", "window", "window-beyond-ctx", "additive-window", "per-key-bias"],
)
def test_mask_measurement_reads_the_pattern(make, kind, window):
    model, value = _graph_with_term(make())
    (term,) = classify_attention_terms(model, [value], PROBE_CTX)
    assert (term.kind, term.window) == (kind, window)


@pytest.mark.parametrize(
    "make, message",
    [
        (
            lambda: _visible(chunk=8),
            r"neither causal nor one causal sliding window \(the query at position 14 sees keys \[8..14\]",
        ),
        (lambda: np.where(_visible(), _per_key_bias(), np.finfo(np.float32).min).astype(np.float32), "mixes a mask"),
        (
            lambda: np.array([[np.arange(PROBE_CTX) - q for q in (14, 15)]], np.float32)[None] * 0.1,
            "differs between queries",
        ),
    ],
    ids=["chunked", "mask-plus-bias", "relative-bias"],
)
def test_mask_measurement_names_a_pattern_it_cannot_rebuild(make, message):
    model, value = _graph_with_term(make())
    with pytest.raises(PreconditionError, match=message):
        classify_attention_terms(model, [value], PROBE_CTX)

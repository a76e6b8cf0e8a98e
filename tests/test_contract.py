"""The retained-state contract lives in one module: its names are spelled nowhere else in the package, and each node
form one pass writes (``qgraph.retained_forms``) is matched back by the matcher beside its builder."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from qgraph import contract
from qgraph.matching import NoMatch
from qgraph.retained_forms import (
    PositionMasks,
    build_kv_scatter,
    match_additive_position_mask,
    match_kv_scatter,
    real_tokens,
)

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = ("qgraph", "passes", "backends")
EXACT = {contract.INPUT_IDS, contract.POSITION_IDS, contract.ATTENTION_MASK, contract.LOGITS}
FRAGMENTS = ("_RetainedState", "past_key", "past_value", "present.")
# A literal that happens to spell a contract name but names something else.
NOT_THE_CONTRACT = {
    # a HuggingFace tokenizer's output key (its own contract, which qgraph's tokenizer follows), not a graph name
    ("qgraph/prompts.py", "input_ids"): "the tokenizer's output key",
    ("qgraph/tokenizer.py", "input_ids"): "the tokenizer's output key",
    ("qgraph/export.py", "past_key_values"): "the attribute of a HuggingFace model's output holding its cache",
}


def _docstrings(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                ids.add(id(first.value))
    return ids


def contract_literals(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every string literal in ``path`` (docstrings aside) that spells a contract name."""
    tree = ast.parse(path.read_text())
    skip = _docstrings(tree)
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Constant) or not isinstance(node.value, str) or id(node) in skip:
            continue
        text = node.value
        if text in EXACT or any(f in text for f in FRAGMENTS):
            found.append((node.lineno, text))
    return found


def test_contract_names_are_spelled_only_in_the_contract_module():
    spelled = {}
    for directory in PACKAGE_DIRS:
        for path in sorted((ROOT / directory).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            hits = [(line, t) for line, t in contract_literals(path) if (rel, t) not in NOT_THE_CONTRACT]
            if hits:
                spelled[rel] = hits
    assert list(spelled) == ["qgraph/contract.py"], {k: v for k, v in spelled.items() if k != "qgraph/contract.py"}


def test_the_grep_sees_a_name_spelled_in_code_but_not_in_a_docstring(tmp_path):
    source = tmp_path / "m.py"
    source.write_text('"""Reads past_key.{i}."""\n\ndef f(x):\n    """logits"""\n    return x["position_ids"]\n')
    assert contract_literals(source) == [(5, "position_ids")]


def _graph_with(position_ids: ir.Value, past: ir.Value, nodes: list[ir.Node], outputs: list[ir.Value]) -> ir.Graph:
    graph = ir.Graph([position_ids, past], outputs, nodes=nodes)
    return graph


def _inputs(ctx_len: int = 8):
    position_ids = ir.Value(name=contract.POSITION_IDS, type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([1, 2]))
    past = ir.Value(
        name=contract.retained_input_name(0, "key"),
        type=ir.TensorType(ir.DataType.FLOAT),
        shape=ir.Shape([1, 2, ctx_len, 4]),
    )
    return position_ids, past


@pytest.mark.parametrize("window", [None, 3])
def test_the_position_mask_builder_and_matcher_agree(window):
    position_ids, past = _inputs()
    masks = PositionMasks(8, position_ids)
    mask = masks.additive(window, ir.DataType.FLOAT, float(np.finfo(np.float32).min))
    _graph_with(position_ids, past, masks.nodes, [mask])
    assert match_additive_position_mask(mask, position_ids) == (-1 if window is None else window)


def test_a_mask_over_other_queries_is_refused_with_the_reason():
    position_ids, past = _inputs()
    other = ir.Value(name="other", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([1, 2]))
    masks = PositionMasks(8, other)
    mask = masks.additive(None, ir.DataType.FLOAT, -1e9)
    ir.Graph([position_ids, other, past], [mask], nodes=masks.nodes)
    with pytest.raises(NoMatch, match="the mask's queries are not position_ids"):
        match_additive_position_mask(mask, position_ids)


def test_a_mask_that_hides_nothing_is_refused_with_the_reason():
    position_ids, past = _inputs()
    masks = PositionMasks(8, position_ids)
    mask = masks.additive(None, ir.DataType.FLOAT, -1.0)
    _graph_with(position_ids, past, masks.nodes, [mask])
    with pytest.raises(NoMatch, match=r"hidden value -1 does not hide a key"):
        match_additive_position_mask(mask, position_ids)


def test_the_kv_scatter_builder_and_matcher_agree_and_the_pair_is_the_contracts():
    position_ids, past = _inputs()
    new = ir.Value(name="new_k", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([1, 2, 2, 4]))
    real_nodes, real = real_tokens(position_ids)
    nodes, present = build_kv_scatter(past, new, position_ids, real)
    present.name = contract.retained_output_name(past.name)
    graph = ir.Graph([position_ids, past, new], [present], nodes=real_nodes + nodes)
    found = match_kv_scatter(present)
    assert (found.past, found.new, found.node) == (past, new, nodes[-1])
    [pair] = contract.kv_pairs(graph)
    assert (pair.layer, pair.kind, pair.input, pair.output) == (0, "key", past, present)
    assert contract.retained_state_problems(graph, ctx_len=8) == [f"{contract.INPUT_IDS} is not an input"]


def test_a_scatter_that_is_not_retained_state_is_refused_with_the_reason():
    position_ids, past = _inputs()
    new = ir.Value(name="new_k", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([1, 2, 2, 4]))
    real_nodes, real = real_tokens(position_ids)
    nodes, present = build_kv_scatter(past, new, position_ids, real)
    ident = ir.node("Identity", [present])
    ir.Graph([position_ids, past, new], [ident.outputs[0]], nodes=real_nodes + nodes + [ident])
    with pytest.raises(NoMatch, match="not a graph output"):
        match_kv_scatter(present)

"""Cloud AI 100's RMSNorm: the ``com.qti.aisw.onnx.CustomRMSNorm`` op, offered to ``rmsnorm-fuse`` as a lowering.

The AI100 compiler maps ``CustomRMSNorm(hidden_states, weight; epsilon)`` to its own kernel (the convention
QEfficient's exports follow). The op is written as a call to a model-local function whose body is the same RMSNorm in
standard ONNX ops, so any other runtime (ONNX Runtime in the tests) executes the graph by inlining it.
"""

from __future__ import annotations

import onnx_ir as ir

from qgraph.passes.rmsnorm import FunctionLowering

DOMAIN = "com.qti.aisw.onnx"
OP_TYPE = "CustomRMSNorm"


def custom_rmsnorm_function(onnx_opset: int) -> ir.Function:
    """``CustomRMSNorm(hidden_states, weight; epsilon)``: the body in standard ONNX ops, type-generic (``CastLike``)."""
    x = ir.Value(name="hidden_states")
    weight = ir.Value(name="weight")
    nodes: list[ir.Node] = []

    def add(op_type: str, inputs, **attributes) -> ir.Value:
        node = ir.node(op_type, inputs, attributes=attributes or None)
        nodes.append(node)
        return node.outputs[0]

    two = add("Constant", [], value_float=2.0)
    square = add("Pow", [x, two])
    if onnx_opset >= 18:
        mean = add("ReduceMean", [square, add("Constant", [], value_ints=[-1])], keepdims=1)
    else:
        mean = add("ReduceMean", [square], axes=[-1], keepdims=1)
    eps_node = ir.Node("", "Constant", [], attributes=[ir.RefAttr("value_float", "epsilon", ir.AttributeType.FLOAT)])
    nodes.append(eps_node)
    eps = add("CastLike", [eps_node.outputs[0], x])
    inv = add("Reciprocal", [add("Sqrt", [add("Add", [mean, eps])])])
    out = add("Mul", [weight, add("Mul", [x, inv])])
    out.name = "output"
    for i, node in enumerate(nodes):
        for v in node.outputs:
            v.name = v.name or f"v{i}"
    graph = ir.Graph([x, weight], [out], nodes=nodes, opset_imports={"": onnx_opset}, name=OP_TYPE)
    return ir.Function(DOMAIN, OP_TYPE, graph=graph, attributes=[ir.AttrFloat32("epsilon", 1e-6)])


CUSTOM_RMSNORM = FunctionLowering(DOMAIN, OP_TYPE, custom_rmsnorm_function)

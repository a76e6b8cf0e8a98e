"""The few private onnxscript helpers qgraph uses, imported in this one place.

``onnxscript.rewriter._ir_utils`` (constants as numpy, with Constant-node folding) and ``onnxscript.rewriter._basics``
(the matching tracer that tells why a rule's ``check`` refused) are not public API: an onnxscript upgrade that moves
them breaks this file only.
"""

from __future__ import annotations

from onnxscript.rewriter import _ir_utils
from onnxscript.rewriter._basics import MatchingTracer, MatchStatus

__all__ = ["MatchStatus", "MatchingTracer", "get_const_value", "get_numpy_value", "get_singleton_value"]

get_const_value = _ir_utils.get_const_value
get_numpy_value = _ir_utils.get_numpy_value
get_singleton_value = _ir_utils.get_singleton_value

"""qgraph: HuggingFace causal LMs to fast inference through ONNX graph passes and pluggable backends."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["QEFFAutoModelForCausalLM", "__version__", "load_tokenizer"]

if TYPE_CHECKING:
    from qgraph.api import QEFFAutoModelForCausalLM
    from qgraph.tokenizer import load_tokenizer


def __getattr__(name: str) -> Any:
    # Lazy: ``import qgraph`` stays cheap and side-effect free; torch and transformers load on first use.
    if name == "QEFFAutoModelForCausalLM":
        from qgraph.api import QEFFAutoModelForCausalLM

        return QEFFAutoModelForCausalLM
    if name == "load_tokenizer":
        from qgraph.tokenizer import load_tokenizer

        return load_tokenizer
    raise AttributeError(f"module 'qgraph' has no attribute {name!r}")

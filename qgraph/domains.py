"""ONNX operator domains qgraph writes, named once (a module with no imports, so a runtime can read them cheaply)."""

# ONNX Runtime's contrib-op domain (its fused kernels: GroupQueryAttention, RotaryEmbedding, SkipLayerNorm, ...).
MS_DOMAIN = "com.microsoft"

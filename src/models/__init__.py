"""Plain-PyTorch model code: MoE layer, dense → MoE conversion, flow utilities (no Lightning/MLflow imports).

Kept import-free on purpose: import the submodule you need (``from src.models.moe import MoEFeedForward``).
"""

"""Optuna sweeps over Dense2MoE experiments: ``python -m src.cli sweep --config sweeps/<name>.yaml``."""

import os
import shutil
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("PYTHONHASHSEED", "0")
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def one_thread():
    """Tiny, dispatch-bound models run faster on one thread and, on a shared machine, avoid OpenMP barrier stalls
    (measured: the skewed-DiT test took 0.8 s on 1 thread, 57 s on 2 under a load of 4)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def mlflow_template(tmp_path_factory) -> Path:
    """A migrated, empty SQLite MLflow store, made once (the first open runs migrations for seconds)."""
    import mlflow

    path = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    mlflow.MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def workdir(tmp_path, monkeypatch, mlflow_template) -> Path:
    """A fresh working folder with its own MLflow store; relative paths of configs resolve here."""
    shutil.copy(mlflow_template, tmp_path / "mlflow.db")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.delenv("DENSE2MOE_PARENT_RUN_ID", raising=False)
    return tmp_path


TINY_FLUX = {
    "patch_size": 1,
    "in_channels": 48,
    "num_layers": 2,
    "num_single_layers": 2,
    "attention_head_dim": 8,
    "num_attention_heads": 2,
    "joint_attention_dim": 16,
    "pooled_projection_dim": 16,
    "guidance_embeds": False,
    "axes_dims_rope": [2, 2, 4],
}


def tiny_teacher_args(tmp: Path, steps: int = 2) -> list[str]:
    """Overrides turning experiments/teacher_tiny.yaml into a seconds-long run on a tiny transformer."""
    import json

    return [
        "--config",
        str(ROOT / "experiments" / "teacher_tiny.yaml"),
        f"--trainer.max_steps={steps}",
        "--trainer.val_check_interval=2",
        "--trainer.limit_val_batches=1",
        "--trainer.enable_progress_bar=false",
        "--trainer.log_every_n_steps=1",
        f"--trainer.default_root_dir={tmp / 'runs'}",
        f"--model.init_args.transformer={json.dumps(TINY_FLUX)}",
        "--model.init_args.patch_size=4",
        "--model.init_args.text_encoder.dim=16",
        "--model.init_args.text_encoder.pooled_dim=16",
        "--model.init_args.sampling.steps=2",
        f"--model.init_args.export_dir={tmp / 'teacher'}",
        "--data.init_args.batch_size=4",
        "--data.init_args.val_prompts_per_task=1",
        "--data.init_args.val_batch_size=6",
    ]


@pytest.fixture(autouse=True)
def _rebind_log_streams():
    """Lightning binds its log handlers to the sys.stderr of import time; point them at this test's stderr."""
    import logging
    import sys

    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                handler.stream = sys.stderr
    yield


# A tiny dense FLUX for the conversion / Taylor / pruning tests (hidden D = 32, FFN width F = 128).
TINY = dict(
    in_channels=16,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,
    pooled_projection_dim=16,
    axes_dims_rope=(4, 6, 6),
)
D, F = 32, 128


def dense_model(seed: int = 0, **overrides):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(**{**TINY, **overrides}).eval()

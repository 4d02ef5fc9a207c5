"""Data parallelism on CPU: 2 gloo processes × batch b reproduce 1 process × batch 2b — per-step losses and final
weights — with DDP and with FSDP (one unit per block, activation checkpointing).

The runs are real ``python -m src.cli fit`` experiments (Taylor init → a shared_kd stage → a moe_kd stage with the
balance loss) on a tiny teacher, launched as subprocesses at once; Lightning re-executes each 2-process command for rank 1. What makes
them equal: each rank draws the global batch's noise and keeps its slice (DistillStage.losses), the shapes stream
gives rank r the r-th slice of the global batch (ShapesStream), the balance loss uses expert loads all-reduced over
the ranks (moe.sync_balance_losses) and the feature-loss normalisers are global means. Without the all-reduce of
the expert loads the DDP balance loss differs by ~6e-4 relative and the weights by ~4e-3 after 4 steps (measured),
far outside the tolerances below.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
from conftest import ROOT, TINY_FLUX
from diffusers import FluxTransformer2DModel
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.strategies.fsdp import _setup_activation_checkpointing
from safetensors.torch import load_file

STEPS = {"stage1_shared": 2, "stage2_moe": 4}
LOSSES = ("train/loss", "train/loss_out", "train/loss_feature", "train/loss_balance")
FSDP = {
    "class_path": "test_ddp.CPUFSDPStrategy",
    "init_args": {"auto_wrap_policy": "blocks", "activation_checkpointing_policy": "blocks"},
}
MODES = {
    "single": {"devices": 1, "batch_size": 8, "strategy": "auto"},
    "ddp": {"devices": 2, "batch_size": 4, "strategy": "ddp"},
    "fsdp": {"devices": 2, "batch_size": 4, "strategy": FSDP},
}
PARALLEL = ("ddp", "fsdp")
_LAUNCH_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT")


class CPUFSDPStrategy(FSDPStrategy):
    """Lightning's FSDPStrategy on CPU processes (gloo): real sharding, all-gathers and reduce-scatters.

    Lightning refuses FSDP without GPUs (for the exact class only), FSDP accepts CPU modules only with
    ``device_id=cpu``, and torch 2.13's FSDP crashes when told to offload to the CPU state it already holds there.
    """

    def _setup_model(self, model):
        from torch.distributed.fsdp import FullyShardedDataParallel

        model = FullyShardedDataParallel(
            module=model,
            mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy,
            device_id=torch.device("cpu"),
            **self.kwargs,
        )
        _setup_activation_checkpointing(model, self._activation_checkpointing_kwargs)
        return model

    def _full_state(self):
        from torch.distributed.fsdp import FullStateDictConfig, StateDictType
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp.api import FullOptimStateDictConfig

        state = FullStateDictConfig(offload_to_cpu=False, rank0_only=True)
        optim = FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=True)
        return FSDP.state_dict_type(self.model, StateDictType.FULL_STATE_DICT, state, optim)

    def lightning_module_state_dict(self):
        with self._full_state():
            return self.model.state_dict()

    def optimizer_state(self, optimizer):
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp import OptimStateKeyType

        optimizer = getattr(optimizer, "_optimizer", optimizer)
        with self._full_state():
            state = FSDP.optim_state_dict(self.model, optimizer)
            if self.global_rank == 0:
                state = FSDP.rekey_optim_state_dict(state, OptimStateKeyType.PARAM_ID, self.model)
            return state


def _config(tmp: Path, teacher: Path, mode: str) -> Path:
    common = {"lr": 1e-3, "warmup_steps": 1, "checkpoint_every": 100, "accelerator": "cpu", **MODES[mode]}
    common["extra_trainer"] = {"log_every_n_steps": 1}
    stages = [
        {"name": name, "kind": name.split("_")[1] + "_kd", "steps": steps, **common} for name, steps in STEPS.items()
    ]
    config = {
        "name": f"dp_check_{mode}",
        "teacher": {"path": str(teacher)},
        "student": {"conversion": {"layout": "1S12E2A", "router_init": "normal"}},
        "taylor": {"batches": 1, "batch_size": 4},
        "stages": stages,
        "evaluation": {"enabled": False},
        "output_dir": str(tmp / f"out_{mode}"),
        "tracking_uri": f"sqlite:///{tmp / f'mlflow_{mode}.db'}",
    }
    path = tmp / f"{mode}.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


@pytest.fixture(scope="module")
def runs(tmp_path_factory, mlflow_template) -> dict[str, dict]:
    tmp = tmp_path_factory.mktemp("dp")
    torch.manual_seed(0)
    FluxTransformer2DModel(**TINY_FLUX).save_pretrained(tmp / "teacher")
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_ENV}
    env |= {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "tests"), *filter(None, [env.get("PYTHONPATH")])])
    procs, ports = {}, _free_ports(len(MODES))  # distinct rendezvous ports: the runs start at the same time
    for mode, port in zip(MODES, ports):
        env["MASTER_PORT"] = str(port)
        shutil.copy(mlflow_template, tmp / f"mlflow_{mode}.db")
        cmd = [sys.executable, "-m", "src.cli", "fit", "--config", str(_config(tmp, tmp / "teacher", mode))]
        procs[mode] = subprocess.Popen(
            [*cmd, "--threads", "1"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
    results = {}
    for mode, proc in procs.items():
        try:
            output, _ = proc.communicate(timeout=400)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
        errors = "\n".join(line for line in output.splitlines() if "Error" in line)  # rank 1's too
        assert proc.returncode == 0, f"{mode} run failed:\n{output[-3000:]}\nerror lines:\n{errors[-3000:]}"
        client = mlflow.MlflowClient(f"sqlite:///{tmp / f'mlflow_{mode}.db'}")
        results[mode] = {"output": output, "out": tmp / f"out_{mode}", "client": client}
    return results


def _runs_named(run: dict, name: str) -> list:
    client = run["client"]
    experiment = client.get_experiment_by_name("dense2moe")
    return [r for r in client.search_runs([experiment.experiment_id]) if r.info.run_name == name]


def _history(run: dict, mode: str, stage: str, key: str) -> list[tuple[int, float]]:
    (stage_run,) = _runs_named(run, f"dp_check_{mode}/{stage}")
    return sorted((m.step, m.value) for m in run["client"].get_metric_history(stage_run.info.run_id, key))


def _weights(run: dict, stage: str = "stage2_moe") -> dict[str, torch.Tensor]:
    return load_file(run["out"] / stage / "student" / "diffusion_pytorch_model.safetensors")


def test_two_processes_really_ran(runs):
    for mode in PARALLEL:
        assert "Starting with 2 processes" in runs[mode]["output"], mode
    assert "Starting with 2 processes" not in runs["single"]["output"]


@pytest.mark.parametrize("mode", PARALLEL)
@pytest.mark.parametrize("stage", STEPS)
def test_logged_losses_equal_one_process_with_doubled_batch(runs, mode, stage):
    for key in LOSSES:
        single, parallel = _history(runs["single"], "single", stage, key), _history(runs[mode], mode, stage, key)
        assert [s for s, _ in single] == [s for s, _ in parallel] == list(range(STEPS[stage])), key
        for (step, a), (_, b) in zip(single, parallel):
            assert b == pytest.approx(a, rel=1e-5, abs=1e-9), f"{mode} {key} at step {step}: 1 process {a}, 2: {b}"
    balance = [v for _, v in _history(runs[mode], mode, stage, "train/loss_balance")]
    assert all(v > 0 for v in balance) if stage == "stage2_moe" else all(v == 0 for v in balance)


@pytest.mark.parametrize("mode", PARALLEL)
@pytest.mark.parametrize("stage", STEPS)
def test_weights_equal_one_process_with_doubled_batch(runs, mode, stage):
    single, parallel = _weights(runs["single"], stage), _weights(runs[mode], stage)
    assert single.keys() == parallel.keys() and any("router" in k for k in single)
    for name in single:
        torch.testing.assert_close(parallel[name], single[name], rtol=0, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("mode", PARALLEL)
def test_rank_zero_alone_owns_the_parent_run_and_the_files(runs, mode):
    run = runs[mode]
    parents = _runs_named(run, f"dp_check_{mode}")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    for stage in STEPS:
        (stage_run,) = _runs_named(run, f"dp_check_{mode}/{stage}")
        assert stage_run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert (run["out"] / stage / "done.json").is_file()
    assert (run["out"] / "taylor_scores.safetensors").is_file()
    assert not list(run["out"].glob("*.partial"))


def test_export_of_the_fsdp_checkpoint_equals_the_gathered_student(runs, tmp_path, capsys):
    """FSDP's full-state checkpoint holds the whole student and its config: ``export`` rebuilds the same model."""
    from src.export import export

    export(str(runs["fsdp"]["out"] / "stage2_moe" / "checkpoints" / "last.ckpt"), str(tmp_path / "exported"))
    exported = load_file(tmp_path / "exported" / "diffusion_pytorch_model.safetensors")
    gathered = _weights(runs["fsdp"])
    assert exported.keys() == gathered.keys()
    for name in gathered:
        torch.testing.assert_close(exported[name], gathered[name], rtol=0, atol=0)


_BALANCE_RANK = """
import sys, torch, torch.distributed as dist
from src.models.moe import MoEConfig, MoEFeedForward, clear_aux_losses, sync_balance_losses
rank, init, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2)
torch.manual_seed(0)
cfg = MoEConfig(num_experts=4, top_k=2, router_init="normal", z_loss_weight=0.01)
layer = MoEFeedForward(8, cfg, ffn_width=32).train()
x_TD = torch.randn(10, 8)
clear_aux_losses(layer)
layer(x_TD[:3] if rank == 0 else x_TD[3:])  # unequal token counts, as MoB sub-batches give
sync_balance_losses(layer)
layer.aux_loss.backward()
loss, grad = layer.aux_loss.detach().clone(), layer.router.weight.grad.clone()
for t in (loss, grad):  # what DDP / FSDP do: the mean over ranks
    dist.all_reduce(t)
    t /= 2
if rank == 0:
    torch.save({"loss": loss, "grad": grad}, out)
dist.destroy_process_group()
"""


def test_balance_loss_all_reduce_equals_one_process_even_with_unequal_token_counts(tmp_path):
    """Rank terms R·(T_r/T)·E·Σ f_i·P_i^r with global f: their mean and mean gradient are the one-process ones."""
    from src.models.moe import MoEConfig, MoEFeedForward

    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_ENV} | {"OMP_NUM_THREADS": "1"}
    args = [str(tmp_path / "init"), str(tmp_path / "out.pt")]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _BALANCE_RANK, str(r), *args], cwd=ROOT, env=env, stderr=subprocess.PIPE
        )
        for r in range(2)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err.decode()[-3000:]
    two_ranks = torch.load(tmp_path / "out.pt")
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=4, top_k=2, router_init="normal", z_loss_weight=0.01)
    layer = MoEFeedForward(8, cfg, ffn_width=32).train()
    layer(torch.randn(10, 8))
    layer.aux_loss.backward()
    torch.testing.assert_close(two_ranks["loss"], layer.aux_loss.detach(), rtol=1e-6, atol=0)
    torch.testing.assert_close(two_ranks["grad"], layer.router.weight.grad, rtol=1e-5, atol=1e-9)

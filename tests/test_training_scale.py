"""What the 12B path needs from a training step, checked at tiny width on CPU: the precision policy, gradient
accumulation equal to a larger batch, and no device → host transfer between logging steps."""

from pathlib import Path

import mlflow
import pytest
import torch
from conftest import TINY_FLUX
from diffusers import FluxTransformer2DModel
from safetensors.torch import load_file

from src.errors import UserError
from src.models.convert import ConversionConfig
from src.training.distill import StageSpec
from src.training.experiment import EvalSpec, StudentSpec, TaylorSpec, TeacherSpec
from src.training.runner import run_experiment


@pytest.fixture(scope="module")
def teachers(tmp_path_factory) -> dict[str, Path]:
    torch.manual_seed(0)
    model = FluxTransformer2DModel(**TINY_FLUX)
    root = tmp_path_factory.mktemp("teachers")
    model.save_pretrained(root / "float32")
    model.to(torch.bfloat16).save_pretrained(root / "bfloat16")
    return {"float32": root / "float32", "bfloat16": root / "bfloat16"}


def run(teachers, out: Path, stages: list[dict], dtype="float32", balance="aux", mob=None, callbacks=None):
    from src.models.mob import MoBConfig

    conversion = ConversionConfig(layout="1S4E2A", balance=balance)
    return run_experiment(
        name=out.name,
        stages=[StageSpec(**{"batch_size": 4, "checkpoint_every": 100, "warmup_steps": 1, **s}) for s in stages],
        teacher=TeacherSpec(path=str(teachers[dtype]), dtype=dtype, preset=None),
        student=StudentSpec(conversion=conversion, mob=MoBConfig(**mob) if mob else None),
        taylor=TaylorSpec(batches=1, batch_size=4),
        evaluation=EvalSpec(enabled=False),
        output_dir=str(out),
        threads=1,
        callbacks=callbacks,
    )


def history(name: str, stage: str, key: str = "train/loss") -> list[float]:
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name("dense2moe")
    (r,) = [r for r in client.search_runs([exp.experiment_id]) if r.info.run_name == f"{name}/{stage}"]
    return [m.value for m in sorted(client.get_metric_history(r.info.run_id, key), key=lambda m: m.step)]


EVERY_STEP = {"extra_trainer": {"log_every_n_steps": 1}}


# --- precision ---------------------------------------------------------------------------------------------------
def test_a_bf16_teacher_gives_fp32_trained_parameters_and_optimizer_state_in_every_stage(teachers, workdir):
    stages = [
        {"name": "s1", "kind": "shared_kd", "steps": 2, "precision": "bf16-mixed"},
        {"name": "s2", "kind": "moe_kd", "steps": 2, "precision": "bf16-mixed"},
        {"name": "s3", "kind": "mob_kd", "steps": 2, "precision": "bf16-mixed"},
    ]
    seen = {}

    class Record(__import__("lightning").pytorch.Callback):
        def on_train_end(self, trainer, module):
            opt = trainer.optimizers[0]
            moments = {v.dtype for state in opt.state.values() for k, v in state.items() if k != "step"}
            seen[module.spec.name] = {
                "trained": {p.dtype for p in module.student.parameters() if p.requires_grad},
                "frozen": {p.dtype for p in module.student.parameters() if not p.requires_grad},
                "moments": moments,
                "teacher": {p.dtype for p in module.teacher.parameters()},
            }

    run(teachers, workdir / "bf16", stages, dtype="bfloat16", mob={"group_size": 2, "active": 1}, callbacks=[Record()])
    for name in ("s1", "s2", "s3"):
        got = seen[name]
        assert got["trained"] == {torch.float32} and got["moments"] == {torch.float32}, (name, got)
        assert got["frozen"] == {torch.bfloat16} and got["teacher"] == {torch.bfloat16}, (name, got)
    # what a stage saves: trained tensors fp32 (stage 2 trains the routed experts), frozen ones bf16
    saved = load_file(workdir / "bf16" / "s2" / "student" / "diffusion_pytorch_model.safetensors")
    assert saved["transformer_blocks.0.ff.w_up"].dtype == torch.float32
    assert saved["transformer_blocks.0.ff.shared_up.weight"].dtype == torch.bfloat16
    assert saved["transformer_blocks.0.attn.to_q.weight"].dtype == torch.bfloat16


def test_a_bf16_mixed_stage_lowers_its_loss_like_the_fp32_one(teachers, workdir):
    curves = {}
    for precision in ("32-true", "bf16-mixed"):
        name = precision.replace("-", "_")
        stage = {"name": "s1", "kind": "shared_kd", "steps": 8, "lr": 3e-3, "precision": precision, **EVERY_STEP}
        run(teachers, workdir / name, [stage])
        curves[precision] = history(name, "s1")
    fp32, bf16 = curves["32-true"], curves["bf16-mixed"]
    drop_fp32, drop_bf16 = 1 - fp32[-1] / fp32[0], 1 - bf16[-1] / bf16[0]
    assert drop_fp32 > 0.2, fp32
    assert abs(drop_bf16 - drop_fp32) < 0.1, (fp32, bf16)


def test_an_unknown_or_half_precision_string_is_one_error_naming_the_field():
    with pytest.raises(ValueError, match=r"precision='bf16-true'.*allowed: 32-true, bf16-mixed, 16-mixed"):
        StageSpec(name="a", kind="moe_kd", precision="bf16-true")
    with pytest.raises(ValueError, match=r"precision='fp8'.*allowed: 32-true, bf16-mixed, 16-mixed"):
        StageSpec(name="a", kind="moe_kd", precision="fp8")


# --- gradient accumulation ----------------------------------------------------------------------------------------
def test_two_micro_batches_of_b_equal_one_batch_of_2b_in_losses_and_weights(teachers, workdir):
    # output loss only (a mean over samples) and aux-loss-free balancing: the bias moves once per optimizer step
    # from the loads of both micro-batches. The feature weights and the "aux" loads are micro-batch statistics.
    def stages(batch, parts):
        common = {"batch_size": batch, "accumulate_grad_batches": parts, "feature_weight": 0.0, **EVERY_STEP}
        return [
            {"name": "s1", "kind": "shared_kd", "steps": 3, **common},
            {"name": "s2", "kind": "moe_kd", "steps": 3, "lr": 3e-3, **common},
        ]

    run(teachers, workdir / "big", stages(8, 1), balance="aux_free")
    run(teachers, workdir / "accum", stages(4, 2), balance="aux_free")
    for stage in ("s1", "s2"):
        big, accum = history("big", stage), history("accum", stage)
        assert len(big) == len(accum) == 3
        torch.testing.assert_close(torch.tensor(accum), torch.tensor(big), rtol=1e-5, atol=0)
        a = load_file(workdir / "accum" / stage / "student" / "diffusion_pytorch_model.safetensors")
        b = load_file(workdir / "big" / stage / "student" / "diffusion_pytorch_model.safetensors")
        for key in b:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=2e-6, msg=key)
    bias = [k for k in b if k.endswith("expert_bias")]
    assert bias and any(b[k].abs().sum() > 0 for k in bias)  # the bias did move, once per step in both runs


def test_accumulation_with_a_stage_kind_that_cannot_use_it_is_one_error_naming_the_field():
    with pytest.raises(ValueError, match=r"accumulate_grad_batches=2 with kind='mob_kd'.*allowed: 1 for mob_kd"):
        StageSpec(name="a", kind="mob_kd", accumulate_grad_batches=2)
    with pytest.raises(ValueError, match=r"accumulate_grad_batches=0"):
        StageSpec(name="a", kind="moe_kd", accumulate_grad_batches=0)


def test_the_cli_reports_a_bad_stage_field_in_one_line(teachers, workdir, capsys):
    from src.cli import main

    with pytest.raises(SystemExit):
        main(
            [
                "fit",
                "--config",
                str(Path(__file__).parents[1] / "experiments" / "debug.yaml"),
                "--teacher.path",
                str(teachers["float32"]),
                "--stages",
                '[{"name": "a", "kind": "mob_kd", "accumulate_grad_batches": 2}]',
            ]
        )
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(err) == 1 and "accumulate_grad_batches" in err[0]


# --- host syncs --------------------------------------------------------------------------------------------------
TRANSFERS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")


def test_no_device_to_host_transfer_between_logging_steps(teachers, workdir, monkeypatch):
    """Every Tensor method that brings a value to the host is counted, by step; only logging and checkpoint
    steps (every 4th) may have any. On a GPU each of these would be a sync that stalls the launch queue."""
    import lightning as L

    state = {"step": None}
    calls: dict[int, list[str]] = {}

    class Window(L.pytorch.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            state["step"] = trainer.global_step  # counted until the next batch starts (logger hooks included)

        def on_train_end(self, trainer, module):
            state["step"] = None

    def counting(name):
        real = getattr(torch.Tensor, name)

        def wrapper(self, *args, **kwargs):
            if state["step"] is not None:
                import traceback

                stack = traceback.extract_stack(limit=8)[:-1]
                # AdamW without fused/capturable keeps its step counter on the host on purpose (torch/optim/adam.py:
                # "Deliberately host `step` on CPU"): reading it is no transfer on a GPU either
                if "torch/optim/" not in stack[-1].filename:
                    trace = " < ".join(f"{Path(f.filename).name}:{f.lineno}" for f in reversed(stack))
                    calls.setdefault(state["step"], []).append(f"{name}: {trace}")
            return real(self, *args, **kwargs)

        return wrapper

    for name in TRANSFERS:
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    stages = [
        {
            "name": "s1",
            "kind": "shared_kd",
            "steps": 8,
            "checkpoint_every": 4,
            "extra_trainer": {"log_every_n_steps": 4},
        },
        {"name": "s2", "kind": "moe_kd", "steps": 8, "checkpoint_every": 4, "extra_trainer": {"log_every_n_steps": 4}},
    ]
    run(teachers, workdir / "syncs", stages, callbacks=[Window()])
    # steps 3 and 7 end at global step 4 and 8: logging + checkpoint steps
    between = {step: where for step, where in calls.items() if step not in (3, 7)}
    assert not between, between
    assert calls.get(3), "the counter saw nothing at a logging step: the mock is not counting"


def test_the_moe_layer_compiles_forward_and_backward_as_one_graph():
    from src.models.moe import MoEConfig, MoEFeedForward

    torch.manual_seed(0)
    layer = MoEFeedForward(64, MoEConfig(router_init="normal", expert_width=16, shared_width=64)).to(torch.bfloat16)
    x = torch.randn(2, 32, 64, dtype=torch.bfloat16, requires_grad=True)
    eager = layer(x)
    (eager.float().square().mean() + layer.aux_loss).backward()
    grads = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    # aot_eager: dynamo capture with fullgraph (any graph break or host read fails) and AOT autograd's backward,
    # without the minutes of C++ code generation inductor needs on CPU
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    (out.float().square().mean() + layer.aux_loss).backward()
    torch.testing.assert_close(out, eager)
    for p, g in zip(layer.parameters(), grads):
        torch.testing.assert_close(p.grad, g)


def test_user_errors_stay_user_errors():
    assert issubclass(__import__("src.training.distill", fromlist=["NonFiniteLossError"]).NonFiniteLossError, UserError)

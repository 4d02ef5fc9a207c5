"""FSDP as configuration: the worked example parses into Lightning's FSDPStrategy, its policies pick exactly the FLUX
blocks, activation checkpointing keeps losses and gradients exact, bad strategy configs are refused by name.
(A 2-process CPU FSDP run of a whole stage is in test_ddp.py.)"""

import copy

import pytest
import torch
from conftest import ROOT, TINY, dense_model
from diffusers import FluxTransformer2DModel
from lightning.pytorch.strategies import FSDPStrategy
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointWrapper,
    apply_activation_checkpointing,
    checkpoint_wrapper,
)
from torch.distributed.fsdp.wrap import ModuleWrapPolicy

from src.cli import main
from src.models.convert import ConversionConfig, convert_flux_to_moe
from src.models.flow import image_ids, text_ids
from src.models.flux_moe import FluxMoESingleTransformerBlock
from src.models.mob import MoBConfig, mob_groups
from src.models.moe import clear_aux_losses, total_aux_loss
from src.training.distill import StageSpec
from src.training.strategies import block_classes, build_strategy, check_strategy, launched_num_nodes

FSDP_PATH = "lightning.pytorch.strategies.FSDPStrategy"
EXAMPLE = ROOT / "experiments" / "flux_dev_moe_l_fsdp.yaml"


def moe_mob_student() -> torch.nn.Module:
    """Tiny MoE student (1S12E2A everywhere) with MoB groups over its single-stream blocks."""
    from src.models.student import with_mob

    conversion = ConversionConfig(split="random", assignment="random", router_init="normal")
    student = convert_flux_to_moe(dense_model(seed=1), conversion)
    torch.manual_seed(3)  # MoB router seed under which the 4 test samples split over both blocks
    return with_mob(
        student, MoBConfig(stream="single", group_size=2, active=1, router_init="normal", router_init_std=1.0)
    )


def test_worked_example_builds_fsdp_with_block_policies_and_fp32_buffers():
    from src.commands import _load_experiment

    stages = _load_experiment(str(EXAMPLE))["stages"]
    assert [s.kind for s in stages] == ["shared_kd", "moe_kd"]
    for spec in stages:
        assert (spec.precision, spec.accelerator, spec.devices) == ("bf16-mixed", "gpu", 8)
        strategy = build_strategy(spec.strategy, spec.kind)
        assert isinstance(strategy, FSDPStrategy)
        assert strategy.kwargs["auto_wrap_policy"]._module_classes == block_classes() | {FluxTransformer2DModel}
        checkpointed = strategy._activation_checkpointing_kwargs["auto_wrap_policy"]._module_classes
        assert checkpointed == block_classes() and FluxMoESingleTransformerBlock in checkpointed
        mp = strategy.mixed_precision_config
        assert (mp.param_dtype, mp.reduce_dtype, mp.buffer_dtype) == (torch.bfloat16, torch.float32, torch.float32)
        assert strategy.sharding_strategy.name == "FULL_SHARD" and strategy._state_dict_type == "full"
        assert strategy.kwargs["use_orig_params"]


def test_wrap_policy_picks_every_block_of_teacher_and_student_and_checkpointing_only_blocks():
    strategy = build_strategy(
        {
            "class_path": FSDP_PATH,
            "init_args": {"auto_wrap_policy": "blocks", "activation_checkpointing_policy": "blocks"},
        }
    )
    teacher, student = dense_model(seed=0), moe_mob_student()
    root = torch.nn.ModuleDict({"teacher": teacher, "student": student})
    blocks = {
        *teacher.transformer_blocks,
        *teacher.single_transformer_blocks,
        *student.transformer_blocks,
        *student.single_transformer_blocks,
    }
    assert any(isinstance(b, FluxMoESingleTransformerBlock) for b in blocks)
    units = set(strategy.kwargs["auto_wrap_policy"]._run_policy(root, set(), {}))
    assert units == blocks | {teacher, student}
    checkpointed = set(strategy._activation_checkpointing_kwargs["auto_wrap_policy"]._run_policy(root, set(), {}))
    assert checkpointed == blocks


def _loss_and_grads(model: torch.nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    batch, side, text = 4, 4, 5
    model.train()
    clear_aux_losses(model)
    out = model(
        hidden_states=torch.randn(batch, side * side, TINY["in_channels"], generator=gen),
        encoder_hidden_states=torch.randn(batch, text, TINY["joint_attention_dim"], generator=gen),
        pooled_projections=torch.randn(batch, TINY["pooled_projection_dim"], generator=gen),
        timestep=torch.rand(batch, generator=gen),
        img_ids=image_ids(side, side),
        txt_ids=text_ids(text),
        return_dict=False,
    )[0]
    loss = out.pow(2).mean() + total_aux_loss(model)
    loss.backward()
    grads = {n.replace("_checkpoint_wrapped_module.", ""): p.grad for n, p in model.named_parameters()}
    return loss.detach(), {n: g for n, g in grads.items() if g is not None}


def test_activation_checkpointing_of_the_blocks_keeps_loss_and_gradients():
    """MoE routing, MoB sub-batches and the balance loss all recompute identically in the backward."""
    plain = moe_mob_student()
    wrapped = copy.deepcopy(plain)
    apply_activation_checkpointing(
        wrapped, checkpoint_wrapper_fn=checkpoint_wrapper, auto_wrap_policy=ModuleWrapPolicy(block_classes())
    )
    n_blocks = len(plain.transformer_blocks) + len(plain.single_transformer_blocks)
    assert sum(isinstance(m, CheckpointWrapper) for m in wrapped.modules()) == n_blocks
    assert wrapped.state_dict().keys() == plain.state_dict().keys()  # checkpoint names survive the wrapping
    loss, grads = _loss_and_grads(plain)
    loss_ckpt, grads_ckpt = _loss_and_grads(wrapped)
    assert float(total_aux_loss(plain).detach()) > 0
    choice = mob_groups(plain)[0].last_choice  # per-sample MoB sub-batches ran, not the whole batch
    assert 0 < int(choice[:, 0].sum()) < choice.shape[0]
    torch.testing.assert_close(loss_ckpt, loss, rtol=0, atol=0)
    assert grads.keys() == grads_ckpt.keys() and any("router" in n for n in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize(
    ("strategy", "kind", "message"),
    [
        ({"class_path": FSDP_PATH, "init_args": {"auto_wrap_policy": "everything"}}, "moe_kd", "auto_wrap_policy"),
        ({"class_path": FSDP_PATH, "init_args": {"auto_wrap_policy": ["NoSuchBlock"]}}, "moe_kd", "NoSuchBlock"),
        ({"class_path": FSDP_PATH, "init_args": {"auto_wrap_policy": ["torch.Tensor"]}}, "moe_kd", "not a torch.nn"),
        ({"class_path": "collections.OrderedDict"}, "moe_kd", "not a Lightning strategy"),
        ({"class_path": FSDP_PATH, "init": {}}, "moe_kd", "unknown keys ['init']"),
        ({"class_path": FSDP_PATH, "init_args": {"mixed_precision": {"param_dtype": "bf16"}}}, "moe_kd", "param_dtype"),
        ({"class_path": FSDP_PATH, "init_args": {"auto_wrap_policy": "blocks"}}, "mob_kd", "mob_kd"),
        ("fsdp", "mob_kd", "deadlock"),
        (["ddp"], "moe_kd", "allowed a Lightning strategy name"),
    ],
)
def test_bad_strategy_is_refused_naming_the_field(strategy, kind, message):
    with pytest.raises(ValueError, match="strategy") as err:
        StageSpec(name="s", kind=kind, strategy=strategy)
    assert message in str(err.value) and "stage 's'" in str(err.value)


def test_bad_strategy_in_a_config_file_is_one_error_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    text = EXAMPLE.read_text().replace("auto_wrap_policy: blocks ", "auto_wrap_policy: all_of_them ", 1)
    assert text != EXAMPLE.read_text()
    bad.write_text(text)
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "flux_dev.yaml").write_text((EXAMPLE.parent / "base" / "flux_dev.yaml").read_text())  # included
    with pytest.raises(SystemExit) as exc:
        main(["params", "--config", str(bad)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "auto_wrap_policy='all_of_them'" in lines[0] and "Traceback" not in err


def test_plain_names_pass_through_and_ddp_for_mob_finds_unused_parameters():
    check_strategy("ddp", "mob_kd")
    assert build_strategy("auto") == "auto"
    assert build_strategy("ddp", "moe_kd") == "ddp"
    assert build_strategy("ddp", "mob_kd") == "ddp_find_unused_parameters_true"


def test_num_nodes_comes_from_the_launcher(monkeypatch):
    for key in ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "SLURM_NTASKS", "SLURM_NNODES", "SLURM_JOB_NAME"):
        monkeypatch.delenv(key, raising=False)
    assert launched_num_nodes() == 1
    monkeypatch.setenv("SLURM_NNODES", "4")  # an allocation alone (no srun tasks) is not a launch
    assert launched_num_nodes() == 1
    monkeypatch.setenv("SLURM_NTASKS", "32")
    monkeypatch.setenv("SLURM_JOB_NAME", "dense2moe")
    assert launched_num_nodes() == 4
    monkeypatch.setenv("WORLD_SIZE", "16")  # torchrun wins: 16 processes, 8 per node
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert launched_num_nodes() == 2

"""The per-GPU memory plan (``params --memory``, src/models/memory.py) against measured allocation peaks of a small
CPU stage, and its one-line errors for configurations the model cannot take."""

import json

import pytest
import torch
from conftest import ROOT
from diffusers import FluxTransformer2DModel

from src.cli import main
from src.models.convert import ConversionConfig
from src.models.flux_moe import dense_ffns
from src.models.memory import StageSetup, allocation_peak, plan_stage
from src.models.mob import MoBConfig
from src.models.student import StudentRecipe, build_student, tensor_bytes
from src.training.conditioning import LatentConditioning
from src.training.distill import DistillStage, StageSpec

# FLUX's structure (guidance, 64 latent channels, T5-like text width) at width 128 (4 heads of 32)
SMALL = dict(
    in_channels=64,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=32,
    num_attention_heads=4,
    joint_attention_dim=64,
    pooled_projection_dim=32,
    guidance_embeds=True,
    axes_dims_rope=(4, 14, 14),
)
B, SIDE, TEXT = 2, 32, 32  # 32×32 latents → 256 image tokens, + 32 text tokens


def measured_and_planned(kind: str, precision: str) -> tuple[int, int]:
    torch.manual_seed(0)
    bf16 = precision == "bf16-mixed"
    teacher = FluxTransformer2DModel(**SMALL).to(torch.bfloat16 if bf16 else torch.float32).eval()
    scores = {name: torch.rand(ffn.up.out_features) for name, ffn in dense_ffns(teacher).items()}
    mob = MoBConfig(stream="single", group_size=2, active=1) if kind == "mob_kd" else None
    recipe = StudentRecipe(conversion=ConversionConfig(layout="1S12E2A", router_init="normal"), mob=mob)
    student = build_student(teacher, recipe, scores=scores)
    spec = StageSpec(name="s", kind=kind, batch_size=B, precision=precision, warmup_steps=1)
    module = DistillStage(teacher, student, spec, LatentConditioning(3.5))
    optimizer = module.configure_optimizers()["optimizer"]
    gen = torch.Generator().manual_seed(0)
    batch = {
        "latents": torch.randn(B, 16, SIDE, SIDE, generator=gen),
        "t5": torch.randn(B, TEXT, 64, generator=gen),
        "pooled": torch.randn(B, 32, generator=gen),
    }

    def step() -> None:  # what Lightning does: autocast around the forward only
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = module.losses(batch)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # the optimizer state exists from here on
    state = sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values() if v.dim())
    measured = tensor_bytes(teacher) + tensor_bytes(student) + state + allocation_peak(step)
    setup = StageSetup(
        trained=frozenset(n for n, p in student.named_parameters() if p.requires_grad),
        compute_dtype=torch.bfloat16 if bf16 else torch.float32,
        teacher_dtype=teacher.dtype,
        batch_size=B,
        image_tokens=(SIDE // 2) ** 2,
        text_tokens=TEXT,
        top_k=0 if kind == "shared_kd" else None,
        kind=kind,
    )
    return measured, plan_stage(teacher, student, setup)["peak"]


@pytest.mark.parametrize(
    "kind, precision",
    [("shared_kd", "bf16-mixed"), ("moe_kd", "32-true"), ("moe_kd", "bf16-mixed"), ("mob_kd", "32-true")],
)
def test_the_plan_is_within_25_percent_of_the_measured_peak_of_a_cpu_stage(kind, precision, one_thread):
    measured, planned = measured_and_planned(kind, precision)
    assert 0.75 <= planned / measured <= 1.25, (kind, precision, planned / 2**20, measured / 2**20)


def params_memory(capsys, *extra: str) -> dict:
    main(["params", "--config", str(ROOT / "experiments" / "flux_dev_moe_l_fsdp.yaml"), "--memory", "--json", *extra])
    return json.loads(capsys.readouterr().out)


def test_flux_dev_stage_2_on_8_gpus_shards_the_counted_state(capsys):
    out = params_memory(capsys, "--gpus", "8", "--stage", "stage2_moe")
    plan = out["memory"]["stage2_moe"]
    assert list(out["memory"]) == ["stage2_moe"]
    assert plan["teacher"] == 11_901_408_320 * 2 // 8  # bf16 teacher, sharded
    # routed experts (12 × 768 wide in 114 FFNs) + routers, fp32 AdamW moments, sharded
    assert 4.30e9 < plan["optimizer"] < 4.32e9
    # the student and its gradients: fp32 flat units under FSDP (≈ 11.9 B + routers, 4 bytes, / 8)
    assert 5.9e9 < plan["student"] < 6.0e9 and 5.9e9 < plan["gradients"] < 6.0e9
    static = plan["teacher"] + plan["student"] + plan["optimizer"]
    assert plan["activations"] > 0 and plan["peak"] == static + plan["activations"] + plan["transient"]
    assert "4096 image + 512 text" in out["settings"]["stage2_moe"]["resolution"]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--height", "1000"], "height=1000: must be a positive multiple of 16"),
        (["--stage", "stage9"], "stage='stage9': not a stage of this experiment"),
        (["--gpus", "0"], "gpus=0: must be >= 1"),
    ],
)
def test_a_plan_the_model_cannot_make_is_one_error_line(capsys, extra, message):
    with pytest.raises(SystemExit) as exc:
        params_memory(capsys, *extra)
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and err.startswith("error: ") and message in err and len(err.splitlines()) == 1

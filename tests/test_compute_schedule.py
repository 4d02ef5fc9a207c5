"""Compute schedules (top-k / MoB κ as functions of σ): validation, the sampler applying them step by step, a constant
schedule equal to the fixed sampler, and the trajectory-averaged accounting against hand computations."""

from __future__ import annotations

import pytest
import torch
from diffusers import FluxTransformer2DModel

from src.models.accounting import count_params, flops_per_image, trajectory_cost
from src.models.compute_schedule import check_schedule, describe, model_schedules, value_at
from src.models.convert import ConversionConfig, convert_flux_to_moe
from src.models.flow import sampling_schedule
from src.models.flux_moe import set_top_k
from src.models.mob import MoBConfig, mob_groups
from src.models.moe import moe_layers
from src.models.pipeline import SamplingConfig, ShapesPipeline
from src.models.presets import TINY_CONFIG
from src.models.student import with_mob

TWO_THEN_ONE = [[1.0, 2], [0.5, 1]]
PROMPTS, SEEDS = ["a photo of a red circle", "a photo of two blue squares"], [3, 4]


def tiny_student(mob: MoBConfig | None = None):
    torch.manual_seed(0)
    dense = FluxTransformer2DModel(**TINY_CONFIG)
    conversion = ConversionConfig(layout="1S4E2A", split="random", assignment="random", router_init="normal")
    student = convert_flux_to_moe(dense, conversion)
    return (with_mob(student, mob) if mob else student).eval()


def pipeline(model, **sampling) -> ShapesPipeline:
    return ShapesPipeline(model, image_size=16, sampling=SamplingConfig(steps=4, cfg_scale=2.0, **sampling))


@pytest.mark.parametrize(
    ("schedule", "why"),
    [
        ([[1.0, 2], [0.5, 1], [0.7, 1]], "overlaps"),
        ([[1.0, 2], [0.5, 1], [0.5, 2]], "overlaps"),
        ([[0.8, 2], [0.5, 1]], "gap"),
        ([[1.0, 2], [0.0, 1]], "outside (0, 1]"),
        ([[1.2, 2]], "outside (0, 1]"),
        ([[1.0, 1.5]], "not an integer"),
        ([[1.0, -1]], "not an integer"),
        ([[1.0, 2, 3]], "pair"),
        ([], "non-empty"),
    ],
)
def test_bad_schedules_are_one_line_naming_the_field(schedule, why):
    with pytest.raises(ValueError) as err:
        SamplingConfig(top_k_schedule=schedule)
    message = str(err.value)
    assert message.startswith("sampling.top_k_schedule=") and why in message and "\n" not in message


def test_mob_schedule_needs_at_least_one_block():
    with pytest.raises(ValueError, match=r"sampling.mob_active_schedule=.*integer ≥ 1"):
        SamplingConfig(mob_active_schedule=[[1.0, 2], [0.3, 0]])


def test_value_at_covers_every_sigma_once():
    schedule = check_schedule([[1.0, 3], [0.6, 2], [0.2, 1]], "s")
    assert [value_at(schedule, s) for s in (1.0, 0.61, 0.6, 0.21, 0.2, 0.05, 0.0)] == [3, 3, 2, 2, 1, 1, 1]
    assert describe(schedule) == "σ ∈ (0.6, 1] → 3, σ ∈ (0.2, 0.6] → 2, σ ∈ [0, 0.2] → 1"
    assert check_schedule([[1, 2.0]], "s") == ((1.0, 2),)  # integral floats from YAML/JSON are accepted


def test_sampler_applies_the_scheduled_top_k_and_kappa_at_each_step():
    model = tiny_student(MoBConfig(stream="single", group_size=2, active=2))
    seen = []
    layer, group = moe_layers(model)[0], mob_groups(model)[0]
    layer.register_forward_pre_hook(lambda m, args: seen.append(("k", m.top_k)))
    group.register_forward_pre_hook(lambda m, args, kwargs: seen.append(("kappa", m.active)), with_kwargs=True)
    pipe = pipeline(model, top_k_schedule=TWO_THEN_ONE, mob_active_schedule=[[1.0, 2], [0.3, 1]])
    pipe(PROMPTS, SEEDS)
    sigmas = sampling_schedule(4, 1.0).tolist()[:4]  # 1, 0.75, 0.5, 0.25; one forward per step (both CFG branches)
    assert [k for what, k in seen if what == "k"] == [2 if s > 0.5 else 1 for s in sigmas]
    assert [k for what, k in seen if what == "kappa"] == [2 if s > 0.3 else 1 for s in sigmas]
    assert layer.top_k == 2 and group.active == 2  # the model's own values come back after sampling


def test_constant_schedule_equals_the_fixed_top_k_sampler():
    model = tiny_student()
    set_top_k(model, 1)
    fixed = pipeline(model)(PROMPTS, SEEDS)
    set_top_k(model, 2)
    scheduled = pipeline(model, top_k_schedule=[[1.0, 1]])(PROMPTS, SEEDS)
    assert (fixed == scheduled).all()
    assert not (pipeline(model)(PROMPTS, SEEDS) == fixed).all()  # the schedule did change something


def test_model_config_schedule_is_the_default_and_an_explicit_one_wins():
    model = tiny_student()
    model.register_to_config(sampling_schedule={"top_k": [[1.0, 1]]})
    assert model_schedules(model)["top_k_schedule"] == ((1.0, 1),)
    from_config = pipeline(model)(PROMPTS, SEEDS)
    model.register_to_config(sampling_schedule=None)
    assert (pipeline(model, top_k_schedule=[[1.0, 1]])(PROMPTS, SEEDS) == from_config).all()


def test_dense_model_ignores_a_top_k_schedule():
    torch.manual_seed(0)
    dense = FluxTransformer2DModel(**TINY_CONFIG).eval()
    assert (pipeline(dense, top_k_schedule=TWO_THEN_ONE)(PROMPTS, SEEDS) == pipeline(dense)(PROMPTS, SEEDS)).all()


def test_top_k_above_the_experts_is_refused_when_applied():
    with pytest.raises(ValueError, match=r"top_k_schedule=.*top-k 5 exceeds num_experts=4"):
        pipeline(tiny_student(), top_k_schedule=[[1.0, 5], [0.5, 1]])(PROMPTS, SEEDS)


def test_trajectory_average_equals_a_hand_computation():
    model = tiny_student()
    tokens = {"image_tokens": 16, "text_len": 16}
    per_k = {}
    for k in (1, 2):
        set_top_k(model, k)
        per_k[k] = (count_params(model)["activated"], flops_per_image(model, **tokens)["total"])
    set_top_k(model, 2)
    # 4 steps at shift 1: σ = 1, 0.75 → k = 2; σ = 0.5, 0.25 → k = 1
    cost = trajectory_cost(model, 4, 1.0, check_schedule(TWO_THEN_ONE, "s"), None, **tokens)
    assert cost["activated"] == (2 * per_k[2][0] + 2 * per_k[1][0]) / 4
    assert cost["flops"] == (2 * per_k[2][1] + 2 * per_k[1][1]) / 4
    assert [row["top_k"] for row in cost["per_step"]] == [[2], [2], [1], [1]]
    # shift 3 spends more steps at high σ: σ = 1, 0.9, 0.75 get k = 2, only σ = 0.5 gets k = 1
    shifted = trajectory_cost(model, 4, 3.0, check_schedule(TWO_THEN_ONE, "s"), None, **tokens)
    assert shifted["flops"] == (3 * per_k[2][1] + per_k[1][1]) / 4
    assert moe_layers(model)[0].top_k == 2


def test_schedule_flops_lie_between_the_two_constant_schedules():
    model = tiny_student(MoBConfig(stream="single", group_size=2, active=2))
    tokens = {"image_tokens": 16, "text_len": 16}

    def flops(top_k, kappa):
        return trajectory_cost(model, 8, 1.0, check_schedule(top_k, "k"), check_schedule(kappa, "m"), **tokens)

    low, high = flops([[1.0, 1]], [[1.0, 1]]), flops([[1.0, 2]], [[1.0, 2]])
    mixed = flops(TWO_THEN_ONE, [[1.0, 2], [0.25, 1]])
    assert low["flops"] < mixed["flops"] < high["flops"]
    assert low["activated"] < mixed["activated"] < high["activated"]
    assert low["total"] == mixed["total"] == high["total"]


def test_export_stores_the_schedule_the_card_shows_it_and_evaluate_follows_it(tmp_path, capsys):
    from evaluation.evaluate import evaluate
    from src.export import export
    from src.models.loading import load_transformer

    tiny_student().save_pretrained(tmp_path / "student")
    export(str(tmp_path / "student"), str(tmp_path / "out"), top_k_schedule=TWO_THEN_ONE)
    exported = load_transformer(tmp_path / "out")
    assert model_schedules(exported)["top_k_schedule"] == ((1.0, 2), (0.5, 1))
    assert moe_layers(exported)[0].top_k == 2  # the stored fixed top-k is untouched
    assert (
        "| sampling top-k by noise level σ | σ ∈ (0.5, 1] → 2, σ ∈ [0, 0.5] → 1 |"
        in (tmp_path / "out" / "README.md").read_text()
    )

    common = dict(images_per_prompt=1, limit=6, steps=4, batch_size=8, log_mlflow=False, device="cpu")
    scheduled = evaluate(str(tmp_path / "out"), out=str(tmp_path / "eval_sched"), **common)
    constant = evaluate(str(tmp_path / "out"), out=str(tmp_path / "eval_k2"), top_k=2, **common)
    assert scheduled["provenance"]["protocol"]["sampler.top_k_schedule"] == [[1.0, 2], [0.5, 1]]
    assert constant["provenance"]["protocol"]["sampler.top_k_schedule"] == [[1.0, 2]]  # --top_k beats the config's
    assert scheduled["cost"]["flops"] < constant["cost"]["flops"]
    assert scheduled["cost"]["params/activated"] < constant["cost"]["params/activated"]


def test_bad_schedule_on_the_command_line_is_one_error_line(tmp_path, capsys):
    from src.cli import main

    tiny_student().save_pretrained(tmp_path / "student")
    args = ["--model", str(tmp_path / "student"), "--out", str(tmp_path / "e"), "--log_mlflow", "false"]
    for schedule, why in (("[[1.0,2],[0.5,1],[0.7,1]]", "overlaps"), ("[[0.9,2]]", "gap"), ("[[1.0,9]]", "exceeds")):
        with pytest.raises(SystemExit) as exc:
            main(["evaluate", *args, "--top_k_schedule", schedule])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: top_k_schedule=") and why in lines[0], err
    assert not (tmp_path / "e").exists()


def test_experiment_evaluation_refuses_schedules_the_student_cannot_follow():
    from src.errors import UserError
    from src.training.experiment import DataSpec, EvalSpec, StudentSpec, validate_schedules

    with pytest.raises(ValueError, match=r"^evaluation.top_k_schedule=.*gap"):
        EvalSpec(top_k_schedule=[[0.5, 1]])
    moe = StudentSpec(conversion=ConversionConfig(layout="1S4E2A"))
    validate_schedules(EvalSpec(top_k_schedule=TWO_THEN_ONE), moe, DataSpec())
    for evaluation, student, data, why in (
        (EvalSpec(top_k_schedule=[[1.0, 5]]), moe, DataSpec(), "4 routed experts"),
        (EvalSpec(mob_active_schedule=[[1.0, 1]]), moe, DataSpec(), "no MoB groups"),
        (EvalSpec(top_k_schedule=TWO_THEN_ONE), StudentSpec(), DataSpec(), "no MoE layers"),
        (EvalSpec(top_k_schedule=TWO_THEN_ONE), moe, DataSpec(kind="latents", path="x"), "latents"),
    ):
        with pytest.raises(UserError, match=why):
            validate_schedules(evaluation, student, data)

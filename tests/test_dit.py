"""Class-conditional DiT / DSMoE / JiTMoE: shapes, interleave, positions, x-prediction, samplers, the recipe's
parameter table, and a few real training steps through the CLI."""

import json
import math

import mlflow
import pytest
import torch
from conftest import ROOT

from src.cli import main
from src.models.dit import (
    DiT,
    DiTConfig,
    FeedForward,
    SamplerConfig,
    apply_rope_2d,
    class_velocity,
    param_counts,
    rope_2d_tables,
    sample,
)
from src.models.dit_presets import MIB, PUBLISHED_ACTIVATED_MIB, dit_config, preset_params
from src.models.flow import guided_velocity, to_velocity
from src.models.moe import MoEConfig, MoEFeedForward
from src.models.moe import set_layers_top_k as set_top_k

pytestmark = pytest.mark.usefixtures("one_thread")


TINY_MOE = {"num_experts": 8, "top_k": 2, "expert_width": 16, "shared_width": 16, "activation": "swiglu"}


def tiny(**overrides) -> DiTConfig:
    base = dict(image_size=16, patch_size=4, hidden=32, depth=4, heads=2, num_classes=5)
    moe = MoEConfig(**TINY_MOE, gate="sigmoid", renormalize=True, route_scale=2.0, balance="aux_free")
    return DiTConfig(**{**base, "moe": moe, **overrides})


@pytest.mark.parametrize("preset", ["dsmoe-s-e48-mini", "dsmoe-s-e16-mini", "dit-s-mini", "jitmoe-mini"])
def test_forward_keeps_the_image_shape(preset):
    torch.manual_seed(0)
    model = DiT(dit_config(preset, depth=3, in_context_start=1))
    x = torch.randn(2, 3, 32, 32)
    out = model(x, torch.rand(2), torch.tensor([0, model.null_class]))
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_learn_sigma_head_is_dropped_from_the_prediction():
    model = DiT(tiny(learn_sigma=True, in_channels=4))
    assert model.final_linear.out_features == 4 * 4 * 8
    assert model(torch.randn(3, 4, 16, 16), torch.rand(3), torch.tensor([0, 1, 2])).shape == (3, 4, 16, 16)


def test_zero_init_output_and_adaln_make_a_fresh_model_predict_zero():
    out = DiT(tiny())(torch.randn(2, 3, 16, 16), torch.rand(2), torch.tensor([1, 2]))
    assert torch.equal(out, torch.zeros_like(out))


def test_interleave_puts_moe_in_odd_blocks():
    kinds = [type(b.ffn) for b in DiT(tiny(depth=6)).blocks]
    assert kinds == [FeedForward, MoEFeedForward] * 3
    assert all(type(b.ffn) is MoEFeedForward for b in DiT(tiny(interleave=False)).blocks)
    assert all(type(b.ffn) is FeedForward for b in DiT(tiny(moe=None)).blocks)


def test_moe_layers_follow_the_config():
    layer = DiT(tiny()).blocks[1].ffn
    assert (layer.num_experts, layer.top_k, layer.num_shared, layer.expert_width) == (8, 2, 1, 16)
    dsmoe = DiT(dit_config("dsmoe-s-e48-mini", depth=2)).blocks[1].ffn
    assert (dsmoe.num_experts, dsmoe.top_k, dsmoe.shared_width, dsmoe.cfg.route_scale) == (48, 5, 32, 2.5)
    assert dsmoe.b_up is None and dsmoe.shared_up.bias is None and dsmoe.out_bias is None  # DSMoE: no biases
    jit = DiT(dit_config("jitmoe-mini", depth=2, in_context_start=1)).blocks[1].ffn
    assert jit.b_up is not None and jit.out_bias is not None  # JiTMoE's experts keep theirs


def test_rope_scores_depend_only_on_relative_position():
    head_dim, grid = 16, 4
    cos, sin = rope_2d_tables(head_dim, grid, theta=100.0)
    q, k = torch.randn(head_dim), torch.randn(head_dim)

    def score(pq: tuple[int, int], pk: tuple[int, int]) -> float:
        iq, ik = pq[0] * grid + pq[1], pk[0] * grid + pk[1]
        rq = apply_rope_2d(q.view(1, 1, 1, -1), cos[iq], sin[iq]).flatten()
        rk = apply_rope_2d(k.view(1, 1, 1, -1), cos[ik], sin[ik]).flatten()
        return float(rq @ rk)

    assert score((0, 1), (2, 0)) == pytest.approx(score((1, 3), (3, 2)), abs=1e-5)  # same (2, -1) offset
    assert score((0, 1), (2, 0)) != pytest.approx(score((0, 1), (0, 2)), abs=1e-3)  # row and column differ
    assert score((0, 0), (1, 0)) != pytest.approx(score((0, 0), (0, 1)), abs=1e-3)


def test_rope_keeps_norms_and_leaves_in_context_tokens_alone():
    cos, sin = rope_2d_tables(8, 3, theta=10000.0, prefix=2)
    x = torch.randn(1, 1, 11, 8)
    y = apply_rope_2d(x, cos, sin)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), atol=1e-5)
    assert torch.equal(y[..., :2, :], x[..., :2, :])
    assert not torch.allclose(y[..., 3:, :], x[..., 3:, :])


def test_positions_select_rope_or_absolute_embedding():
    rope, absolute = DiT(tiny(positions="rope2d")), DiT(tiny(positions="absolute"))
    assert rope.pos_embed is None and rope.use_rope
    assert absolute.pos_embed.shape == (16, 32) and not absolute.use_rope
    assert "pos_embed" not in absolute.state_dict()  # fixed, not a parameter: counts exclude it
    with pytest.raises(ValueError, match="head width"):
        tiny(hidden=36, heads=6)  # head width 6 is not a multiple of 4


def test_x_prediction_velocity_and_target():
    x, noise, t = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), torch.tensor([0.3, 0.7])
    z = t.view(-1, 1, 1, 1) * x + (1 - t.view(-1, 1, 1, 1)) * noise
    assert torch.allclose(-to_velocity(x, z, 1 - t, "sample"), x - noise, atol=1e-5)  # a perfect x̂ gives v = x − ε
    clamped = -to_velocity(x, z, 1 - torch.tensor([0.99, 0.99]), "sample", min_sigma=0.05)
    assert torch.allclose(clamped, (x - z) / 0.05)
    assert to_velocity(x, z, 1 - t, "velocity") is x


def test_sampler_reaches_the_data_point_of_a_perfect_x_predictor():
    target = torch.randn(2, 3, 4, 4)

    def model(z, t, y):
        return target.repeat(z.shape[0] // 2, 1, 1, 1)

    for method in ("euler", "heun"):
        out = sample(
            model, torch.randn(2, 3, 4, 4), torch.tensor([0, 1]), 9, "x", SamplerConfig(method=method, steps=4)
        )
        assert torch.allclose(out, target, atol=1e-5), method


def test_heun_is_more_accurate_than_euler():
    def model(z, t, y):  # dz/dt = −z: z(1) = z(0)·e^−1
        return -z

    z0 = torch.ones(1, 1, 1, 1)
    exact = math.exp(-1)
    errors = {
        m: abs(float(sample(model, z0, torch.tensor([0]), 1, "v", SamplerConfig(method=m, steps=8))) - exact)
        for m in ("euler", "heun")
    }
    assert errors["heun"] < errors["euler"] / 5


def test_cfg_applies_only_inside_its_interval():
    calls = []

    def model(z, t, y):  # conditional velocity 1, unconditional 0, per sample
        calls.append(z.shape[0])
        return (y != 7).float().view(-1, 1, 1, 1).expand_as(z).clone()

    cfg = SamplerConfig(steps=4, cfg_scale=3.0, cfg_interval=(0.5, 1.0))
    out = sample(model, torch.zeros(2, 1, 1, 1), torch.tensor([0, 1]), 7, "v", cfg)
    # t = 0, 0.25 unguided (velocity 1); t = 0.5, 0.75 guided (0 + 3·(1 − 0) = 3); steps of 0.25
    assert torch.allclose(out, torch.full_like(out, 0.25 * (1 + 1 + 3 + 3)))
    assert calls == [2, 2, 4, 4]  # the null branch runs only where guidance applies
    velocity = class_velocity(model, torch.tensor([0, 1]), 7, "v")
    v = -guided_velocity(velocity, torch.zeros(2, 1, 1, 1), 1 - 0.6, cfg_scale=1.0)
    assert torch.equal(v, torch.ones_like(v))  # scale 1: no guidance anywhere


RECIPE_2_20 = {  # analytic counts (docs/design.md §3.3) ÷ 2^20, one decimal
    "dsmoe-s-e16": 33.3,
    "dsmoe-s-e48": 29.7,
    "dsmoe-b-e16": 132.2,
    "dsmoe-b-e48": 117.7,
    "dsmoe-l-e16": 464.7,
    "dsmoe-l-e48": 435.6,
    "dsmoe-3b-e16": 964.6,
    "jitmoe-b16-e16": 133.0,
    "jitmoe-l16-e16": 465.8,
}
RECIPE_TOTAL_DECIMAL = {  # the same table's totals, in millions
    "dsmoe-s-e16": 96.9,
    "dsmoe-s-e48": 69.2,
    "dsmoe-b-e16": 386.3,
    "dsmoe-b-e48": 275.6,
    "dsmoe-l-e16": 1368.1,
    "dsmoe-l-e48": 1166.9,
    "dsmoe-3b-e16": 3101.7,
    "jitmoe-b16-e16": 387.4,
    "jitmoe-l16-e16": 1369.8,
}


@pytest.mark.parametrize("preset", list(PUBLISHED_ACTIVATED_MIB))
def test_recipe_presets_activate_the_published_parameters(preset):
    counts = preset_params(preset)
    activated = counts["activated"] / MIB
    assert activated == pytest.approx(RECIPE_2_20[preset], abs=0.05)
    # The README rounds, except JiTMoE-L/16-E16 (465.8 printed as 465): it matches rounded or truncated.
    assert PUBLISHED_ACTIVATED_MIB[preset] in (round(activated), math.floor(activated))
    assert counts["total"] / 1e6 == pytest.approx(RECIPE_TOTAL_DECIMAL[preset], abs=0.05)


def test_dense_baselines_match_their_published_decimal_sizes():
    assert preset_params("jit-b16")["activated"] / 1e6 == pytest.approx(131.1, abs=0.05)
    assert preset_params("dit-l")["activated"] / 1e6 == pytest.approx(457.8, abs=0.05)
    dit_s = preset_params("dit-s")
    assert dit_s["total"] == dit_s["activated"]


def test_mini_dense_baseline_matches_the_mini_moe_in_activated_parameters():
    moe, dense = preset_params("dsmoe-s-e48-mini")["activated"], preset_params("dit-s-mini")["activated"]
    assert abs(moe - dense) / moe < 1e-4
    assert preset_params("dsmoe-s-e48-mini")["total"] > 2 * moe


def test_param_counts_scale_with_top_k():
    model = DiT(tiny())
    base = param_counts(model)["activated"]
    set_top_k(model, 3)
    layer = model.blocks[1].ffn
    per_expert = (layer.w_up.numel() + layer.b_up.numel() + layer.w_down.numel()) // layer.num_experts
    assert param_counts(model)["activated"] - base == 2 * per_expert  # two MoE blocks, one more expert each


def test_bad_preset_and_override_name_the_problem():
    with pytest.raises(ValueError, match="preset='nope'"):
        dit_config("nope")
    with pytest.raises(ValueError, match="bogus"):
        dit_config("dit-s-mini", bogus=1)
    assert dit_config("dsmoe-s-e48-mini", moe={"top_k": 3}).moe.num_experts == 48  # merged into the layout


TRAIN_OVERRIDES = {
    "hidden": 32,
    "depth": 2,
    "heads": 2,
    "moe": {"num_experts": 8, "top_k": 2, "expert_width": 16, "shared_width": 16, "bias_update_rate": 0.01},
}


def test_fit_through_the_cli_logs_losses_load_and_samples(workdir, capsys):
    args = [
        "fit",
        "--config",
        str(ROOT / "experiments" / "dsmoe_s_e48.yaml"),
        "--trainer.max_steps=3",
        "--trainer.val_check_interval=3",
        "--trainer.limit_val_batches=1",
        "--trainer.enable_progress_bar=false",
        "--trainer.log_every_n_steps=1",
        f"--trainer.default_root_dir={workdir / 'runs'}",
        f"--model.init_args.model={json.dumps(TRAIN_OVERRIDES)}",
        "--model.init_args.sampler.steps=2",
        "--data.init_args.batch_size=4",
        "--data.init_args.val_images_per_class=1",
        "--data.init_args.val_batch_size=24",
    ]
    main(args)
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("dsmoe_shapes").experiment_id])
    metrics = run.data.metrics
    assert run.info.status == "FINISHED" and math.isfinite(metrics["train/loss"])
    assert {"val/class_accuracy", "experts/max_over_mean_load", "experts/layer00/router_entropy"} <= metrics.keys()
    assert int(run.data.params["params/activated"]) < int(run.data.params["params/total"])
    assert metrics["params/activated"] == int(run.data.params["params/activated"])
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert len(history) == 3
    samples = [a.path for a in client.list_artifacts(run.info.run_id, "samples")]
    assert samples == ["samples/classes_step_0000003.png"]
    experts = {a.path for a in client.list_artifacts(run.info.run_id, "experts")}
    assert "experts/load_heatmap.png" in experts


@pytest.mark.parametrize("accumulate", [1, 2])
def test_aux_free_bias_moves_once_per_optimizer_step(accumulate):
    import lightning as L

    from src.data.classes import ClassShapesDataModule
    from src.training.dit import DiTModule

    torch.manual_seed(0)
    module = DiTModule(preset="dsmoe-s-e48-mini", model=TRAIN_OVERRIDES)
    trainer = L.Trainer(
        max_steps=2,
        accumulate_grad_batches=accumulate,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(module, ClassShapesDataModule(batch_size=4))
    bias = module.model.blocks[1].ffn.expert_bias
    steps = bias / 0.01  # each update moves every expert by exactly ±γ (or 0 at the mean load)
    assert torch.allclose(steps, steps.round(), atol=1e-4)
    assert steps.abs().max() == 2 and bias.sum() != 0
    assert module.model.blocks[1].ffn.pending_counts.sum() == 0  # consumed by the last update


def test_jit_objective_trains_an_x_predictor():
    from src.training.dit import DiTModule

    module = DiTModule(preset="jitmoe-mini", model={"depth": 2, "in_context_start": 1}, objective="jit")
    batch = {"image": torch.rand(4, 3, 32, 32) * 2 - 1, "label": torch.tensor([0, 1, 2, 3])}
    opt = torch.optim.AdamW(module.parameters(), lr=1e-3)
    torch.manual_seed(0)
    loss = module.training_step(batch, 0)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss) and module.model.final_linear.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="objective='flow'"):
        DiTModule(preset="jitmoe-mini", objective="flow")

"""The sampling fast paths equal the paths they replace: both guidance branches in one batch, MoB's sorted
inference gathers, the router's plain inference GEMM, and sampling without load bookkeeping."""

from __future__ import annotations

import pytest
import torch
from diffusers import FluxTransformer2DModel
from test_mob import make_blocks, make_group, make_inputs

from src.models.convert import ConversionConfig, convert_flux_to_moe
from src.models.flow import ode_sample
from src.models.mob import MoBConfig, mob_groups
from src.models.moe import (
    MoEConfig,
    MoEFeedForward,
    RouterLogits,
    load_tracking,
    moe_layers,
    router_logits,
    samples_independent,
)
from src.models.pipeline import SamplingConfig, ShapesPipeline
from src.models.presets import TINY_CONFIG
from src.models.student import with_mob

PROMPTS = ["a photo of a red circle", "a photo of two blue squares", "a photo of a green triangle"]
SEEDS = [3, 4, 5]


def tiny_models() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    dense = FluxTransformer2DModel(**TINY_CONFIG).eval()
    conversion = ConversionConfig(layout="1S4E2A", split="random", assignment="random", router_init="normal")
    moe = convert_flux_to_moe(dense, conversion).eval()
    mob = MoBConfig(stream="both", group_size=2, active=1, router_init="normal", router_init_std=1.0)
    moe_mob = with_mob(convert_flux_to_moe(dense, conversion), mob).eval()
    return {"dense": dense, "moe": moe, "moe_mob": moe_mob}


def test_euler_batched_guidance_is_the_same_integration():
    calls = []

    def velocity(x, sigma, conditional):
        calls.append((conditional, x.shape[0]))
        if conditional is None:  # first half conditional, second half unconditional
            return torch.cat([2.0 * x[: len(x) // 2] + sigma[:1], x[len(x) // 2 :] - 1.0])
        return 2.0 * x + sigma[:1] if conditional else x - 1.0

    noise = torch.randn(3, 4, 5)
    separate = ode_sample(velocity, noise, steps=5, cfg_scale=3.0, shift=2.0)
    assert [c for c, _ in calls] == [True, False] * 5
    calls.clear()
    batched = ode_sample(velocity, noise, steps=5, cfg_scale=3.0, shift=2.0, batch_cfg=True)
    assert calls == [(None, 6)] * 5
    torch.testing.assert_close(batched, separate, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["dense", "moe", "moe_mob"])
def test_pipeline_batched_guidance_equals_two_calls(name):
    model = tiny_models()[name]
    pipe = ShapesPipeline(model, image_size=16, sampling=SamplingConfig(steps=4, cfg_scale=2.5))
    assert samples_independent(model)
    separate = pipe.sample_tokens(PROMPTS, SEEDS, batch_cfg=False)
    batched = pipe.sample_tokens(PROMPTS, SEEDS)  # the default for these models
    # per-sample computation in a larger batch: only float rounding of the GEMM blocking differs
    torch.testing.assert_close(batched, separate, rtol=0, atol=1e-5)
    assert not torch.equal(separate[0], separate[1])


def test_expert_choice_with_a_batch_pool_keeps_the_branches_apart():
    torch.manual_seed(0)
    dense = FluxTransformer2DModel(**TINY_CONFIG)
    conversion = ConversionConfig(
        layout="1S4E2A",
        split="random",
        assignment="random",
        router_init="normal",
        routing="expert_choice",
        balance="none",
        pool="batch",
    )
    student = convert_flux_to_moe(dense, conversion).eval()
    assert not samples_independent(student)
    batches = []
    handle = student.register_forward_pre_hook(
        lambda module, args, kwargs: batches.append(kwargs["hidden_states"].shape[0]), with_kwargs=True
    )
    ShapesPipeline(student, image_size=16, sampling=SamplingConfig(steps=2, cfg_scale=2.0))(PROMPTS, SEEDS)
    handle.remove()
    assert batches == [3, 3, 3, 3]  # two calls of B per step: a sample's routing never sees the other branch
    conversion.pool = "sample"
    assert samples_independent(convert_flux_to_moe(dense, conversion))


@pytest.mark.parametrize("active", [1, 2, 3])
@pytest.mark.parametrize("gate", ["straight_through", "score"])
@pytest.mark.parametrize("kind", ["single", "double"])
def test_mob_sorted_inference_equals_per_block_gathers(active, gate, kind):
    cfg = MoBConfig(stream=kind, group_size=4, active=active, gate=gate, router_init="normal", router_init_std=1.0)
    group = make_group(cfg)
    blocks = make_blocks(kind, 4)
    hidden, encoder, temb, rope = make_inputs(batch=7)
    with torch.no_grad():
        fast = group(blocks, hidden, encoder, temb, rope)
    starts = group.last_choice.to(torch.uint8).argmax(1)
    assert len(set(starts.tolist())) > 1, "the case must spread the samples over several windows"
    with torch.enable_grad():  # the per-block gather path (training)
        reference = group(blocks, hidden, encoder, temb, rope)
    for got, want in zip(fast, reference):
        torch.testing.assert_close(got, want.detach(), rtol=0, atol=1e-6)
    # the input is never written in place
    again = make_inputs(batch=7)
    assert torch.equal(hidden, again[0]) and torch.equal(encoder, again[1])


def test_mob_sorted_inference_when_every_sample_takes_the_first_window():
    cfg = MoBConfig(stream="single", group_size=3, active=2, router_init="zeros")  # ties → window 0 for all
    group = make_group(cfg)
    blocks = make_blocks("single", 3)
    hidden, encoder, temb, rope = make_inputs(batch=4)
    with torch.no_grad():
        fast = group(blocks, hidden, encoder, temb, rope)
    assert group.last_choice[:, :2].all() and not group.last_choice[:, 2].any()
    with torch.enable_grad():
        reference = group(blocks, hidden, encoder, temb, rope)
    for got, want in zip(fast, reference):
        torch.testing.assert_close(got, want.detach(), rtol=0, atol=1e-6)
    assert torch.equal(hidden, make_inputs(batch=4)[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_router_inference_gemm_equals_the_autograd_function(dtype):
    torch.manual_seed(0)
    weight, x = torch.randn(12, 64).to(dtype), torch.randn(40, 64).to(dtype)
    with torch.no_grad():
        plain = router_logits(weight, x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            under_autocast = router_logits(weight, x)
    reference = RouterLogits.apply(weight, x)
    assert plain.dtype == under_autocast.dtype == torch.float32
    assert torch.equal(plain, reference) and torch.equal(under_autocast, reference)


def test_sampling_keeps_no_load_statistics_and_restores_the_switch():
    model = tiny_models()["moe_mob"]
    layers = moe_layers(model)
    for layer in layers:
        layer.track_load = True  # even when a user left the switch on, the pipeline samples without it
    ShapesPipeline(model, image_size=16, sampling=SamplingConfig(steps=2, cfg_scale=2.0))(PROMPTS, SEEDS)
    assert all(layer.last_topk_idx_TK is None for layer in layers)
    assert all(int(layer.last_counts.sum()) == 0 for layer in layers)
    assert all(layer.track_load for layer in layers)  # restored
    assert all(group.last_choice is not None for group in mob_groups(model))
    # an inference forward records nothing by default, and leaves no stale balance loss behind
    layer = MoEFeedForward(16, MoEConfig(num_experts=4, top_k=2, router_init="normal"))
    layer(torch.randn(5, 16))
    assert int(layer.last_counts.sum()) == 10 and layer.aux_loss.item() > 0  # training: recorded
    layer.eval()
    with torch.no_grad():
        layer(torch.randn(7, 16))
    assert int(layer.last_counts.sum()) == 10 and layer.aux_loss.item() == 0.0
    with torch.no_grad(), load_tracking(layer, True):
        layer(torch.randn(7, 16))
    assert int(layer.last_counts.sum()) == 14 and not layer.track_load

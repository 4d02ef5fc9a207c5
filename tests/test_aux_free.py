"""Aux-loss-free balancing (DeepSeek-V3's selection bias, which the recipe's code registers but never updates):
on a skewed toy, the max/mean expert load over training falls with the bias updates and stays high without."""

import pytest
import torch
from torch import nn

from src.data.classes import ClassShapesDataModule
from src.models.moe import MoEConfig, MoEFeedForward, moe_layers
from src.training.dit import DiTModule

D = 16


pytestmark = pytest.mark.usefixtures("one_thread")


def recipe_layer(balance: str) -> MoEFeedForward:
    """The recipe's layer in small: 1 shared + 16 routed SwiGLU experts, top-2, sigmoid, renormalised, ×2."""
    cfg = MoEConfig(
        num_experts=16,
        top_k=2,
        num_shared=1,
        expert_width=8,
        shared_width=8,
        activation="swiglu",
        gate="sigmoid",
        renormalize=True,
        route_scale=2.0,
        balance=balance,
        bias_update_rate=0.02,
        router_init="normal",
    )
    return MoEFeedForward(D, cfg)


def train_skewed_layer(balance: str, steps: int = 80) -> list[float]:
    """Max/mean load per step while the layer (router included) learns a regression on skewed inputs."""
    torch.manual_seed(0)
    layer = recipe_layer(balance)
    offset = torch.zeros(D)
    offset[0] = 2.0
    with torch.no_grad():  # every input shares a direction that the router ties to experts 0 and 1
        layer.router.weight[:2, 0] = 1.5
    teacher = nn.Sequential(nn.Linear(D, 32), nn.GELU(), nn.Linear(32, D))
    opt = torch.optim.Adam(layer.parameters(), lr=3e-3)
    loads = []
    for _ in range(steps):
        x = torch.randn(512, D) + offset
        with torch.no_grad():
            y = teacher(x)
        loss = (layer(x) - y).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        layer.update_expert_bias()
        loads.append(layer.load_stats()["max_over_mean_load"].item())
    return loads


def test_bias_updates_flatten_a_skewed_load_while_the_router_learns():
    free, none = train_skewed_layer("aux_free"), train_skewed_layer("none")
    assert none[0] > 6 and free[0] > 6  # both start with experts 0 and 1 taking almost every token (max 8)
    late_free, late_none = sum(free[-20:]) / 20, sum(none[-20:]) / 20
    assert late_none > 6  # learning alone does not rebalance
    assert late_free < 3 and late_free < late_none / 2.5


def test_dit_module_balances_a_skewed_router_over_training_steps():
    """The module's own update path (optimizer step → update_expert_biases) on a DiT whose routers start aligned
    with the mean token, so expert 0 wins nearly every token, against the same run without balancing."""
    images = ClassShapesDataModule(batch_size=8).train_stream.batch(0)

    def run(balance: str) -> list[float]:
        torch.manual_seed(0)
        moe = {"num_experts": 8, "top_k": 2, "expert_width": 16, "shared_width": 16, "balance": balance}
        moe["bias_update_rate"] = 0.01
        module = DiTModule(preset="dsmoe-s-e48-mini", model={"hidden": 32, "depth": 2, "heads": 2, "moe": moe})
        layers = [m for m in moe_layers(module.model) if m.num_experts]
        mean_input = {}
        hooks = [
            layer.register_forward_pre_hook(lambda m, a: mean_input.setdefault(m, a[0].reshape(-1, m.dim).mean(0)))
            for layer in layers
        ]
        with torch.no_grad():
            module.training_step(images, 0)
            for layer in layers:  # spread-out routers, expert 0's aligned with the mean token
                layer.router.weight.normal_(std=0.3)
                layer.router.weight[0] = 20 * mean_input[layer] / mean_input[layer].norm()
        for hook in hooks:
            hook.remove()
        opt = torch.optim.AdamW(module.parameters(), lr=1e-3)
        loads = []
        for step in range(40):
            loss = module.training_step(images, step)
            opt.zero_grad()
            loss.backward()
            opt.step()
            module.update_expert_biases()
            loads.append(sum(m.load_stats()["max_over_mean_load"].item() for m in layers) / len(layers))
        return loads

    free, none = run("aux_free"), run("none")
    assert free[0] > 3 and none[0] > 3  # expert 0 takes most tokens (the maximum is E/K = 4)
    late_free, late_none = sum(free[-10:]) / 10, sum(none[-10:]) / 10
    assert late_none > 3 and late_free < 2.5 and late_free < 0.7 * late_none

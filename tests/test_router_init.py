"""A freshly converted student spreads tokens over its routed experts (tied "zeros" routers do not)."""

import pytest
import torch
from conftest import dense_model

from src.models.convert import ConversionConfig, convert_flux_to_moe
from src.models.moe import load_tracking, moe_layers


def _first_forward_loads(router_init: str | None) -> list[torch.Tensor]:
    dense = dense_model()
    config = (
        ConversionConfig(split="random")
        if router_init is None
        else ConversionConfig(split="random", router_init=router_init)
    )
    student = convert_flux_to_moe(dense, config).eval()
    gen = torch.Generator().manual_seed(0)
    batch, image_tokens, text_tokens = 4, 64, 8
    with torch.no_grad(), load_tracking(student, True):
        student(
            hidden_states=torch.randn(batch, image_tokens, 16, generator=gen),
            encoder_hidden_states=torch.randn(batch, text_tokens, 32, generator=gen),
            pooled_projections=torch.randn(batch, 16, generator=gen),
            timestep=torch.rand(batch, generator=gen),
            img_ids=torch.zeros(image_tokens, 3),
            txt_ids=torch.zeros(text_tokens, 3),
        )
    return [layer.last_counts.clone() for layer in moe_layers(student)]


def test_the_default_router_init_spreads_tokens_over_the_experts():
    loads = _first_forward_loads(None)
    assert ConversionConfig().router_init == "centroids"
    for counts_E in loads:
        # 1S12E2A: top-2 of 12; a collapsed layer would use exactly 2 experts
        assert (counts_E > 0).sum() >= 6
        assert counts_E.max() / counts_E.sum() < 0.4
    used = torch.stack(loads) > 0
    assert used.float().mean() >= 0.75


@pytest.mark.parametrize("router_init", ["normal", "centroids"])
def test_untied_inits_use_more_than_top_k_experts_in_every_layer(router_init):
    for counts_E in _first_forward_loads(router_init):
        assert (counts_E > 0).sum() > 2


def test_tied_zero_routers_send_every_token_to_the_same_top_k_experts():
    for counts_E in _first_forward_loads("zeros"):
        assert (counts_E > 0).sum() == 2

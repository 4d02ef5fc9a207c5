"""Parameter and FLOP accounting against FLUX.1-dev's known size and hand computations on tiny models."""

from __future__ import annotations

import pytest
import torch
from diffusers import FluxTransformer2DModel

from src.models.accounting import count_params, flops_per_image, image_tokens_for
from src.models.dit import DiT, param_counts
from src.models.dit_presets import dit_config
from src.models.mob import MoBConfig
from src.models.moe import MoEConfig, MoEFeedForward
from src.models.presets import FLUX_DEV_CONFIG, TINY_CONFIG, flux_config

LOCATIONS = ["ff", "ff_context", "single"]
LAYOUT_1S12E2A = {"num_experts": 12, "top_k": 2, "num_shared": 1}


def flux_moe_class():
    return pytest.importorskip("src.models.flux_moe").FluxMoETransformer2DModel


def tiny_dense() -> FluxTransformer2DModel:
    torch.manual_seed(0)
    return FluxTransformer2DModel(**TINY_CONFIG)


def hand_flops(cfg: dict, image: int, text: int) -> int:
    """Dense FLUX forward FLOPs per image, written out block by block."""
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    f, joint = 4 * d, image + text
    scores = 2 * 2 * joint * joint * d
    # per stream: q, k, v, out projections + FFN up/down; AdaLN-zero D → 6D on one row per stream
    double = 2 * (image + text) * (4 * d * d + 2 * d * f) + 2 * 2 * d * 6 * d + scores
    # q, k, v + proj_mlp + fused proj_out (D + F → D); AdaLN D → 3D
    single = 2 * joint * (3 * d * d + d * f + (d + f) * d) + 2 * d * 3 * d + scores
    time_embedders = 2 if cfg["guidance_embeds"] else 1
    embedders = (
        2 * image * cfg["in_channels"] * d  # x_embedder
        + 2 * text * cfg["joint_attention_dim"] * d  # context_embedder
        + time_embedders * 2 * (256 * d + d * d)  # timestep (and guidance) MLPs on 256 sinusoid channels
        + 2 * (cfg["pooled_projection_dim"] * d + d * d)  # pooled text MLP
        + 2 * d * 2 * d  # norm_out modulation
        + 2 * image * d * cfg["in_channels"]  # final proj_out (patch_size 1)
    )
    return cfg["num_layers"] * double + cfg["num_single_layers"] * single + embedders


def test_flux_dev_total_on_meta():
    with torch.device("meta"):
        model = FluxTransformer2DModel(**FLUX_DEV_CONFIG)
    counts = count_params(model)
    assert counts["total"] == 11_901_408_320
    assert counts["activated"] == counts["total"]
    by = counts["by_component"]
    assert by["ffn"]["total"] == 5_738_858_496  # docs/design.md §4.3: FFN-type weights ≈ 5.74B
    # per-block AdaLN ≈ 3.23B (docs/design.md §4.3) plus norm_out's D → 2D
    d = 3072
    assert (
        by["adaln_modulation"]["total"] == 19 * 2 * (d * 6 * d + 6 * d) + 38 * (d * 3 * d + 3 * d) + d * 2 * d + 2 * d
    )
    assert counts["activated_without_modulation"] == counts["total"] - by["adaln_modulation"]["total"]


def test_flux_dev_flops_match_hand_count():
    with torch.device("meta"):
        model = FluxTransformer2DModel(**FLUX_DEV_CONFIG)
    flops = flops_per_image(model, height=1024, width=1024, text_len=512)
    assert flops["image_tokens"] == 4096
    assert flops["total"] == hand_flops(FLUX_DEV_CONFIG, 4096, 512)
    assert flops_per_image(model, image_tokens=4096, text_len=512)["total"] == flops["total"]


def test_tiny_dense_counts_every_parameter_once():
    model = tiny_dense()
    counts = count_params(model)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["activated"] == counts["total"]
    assert counts["by_component"]["other"]["total"] == 0
    assert flops_per_image(model, image_tokens=64, text_len=16)["total"] == hand_flops(TINY_CONFIG, 64, 16)


def routed_params(layer: MoEFeedForward) -> tuple[int, int]:
    """(all routed expert parameters, those of top_k experts) of one MoE layer, by hand."""
    num_experts, dim, width = layer.w_up.shape
    per_expert = dim * width + width + width * dim
    return num_experts * per_expert, layer.top_k * per_expert


def test_moe_layer_activated_by_hand():
    dim = 64
    layer = MoEFeedForward(dim, MoEConfig(**LAYOUT_1S12E2A, shared_width=64, expert_width=16))
    counts = count_params(layer)
    shared = dim * 64 + 64 + 64 * dim
    routed_total, routed_active = 12 * (dim * 16 + 16 + 16 * dim), 2 * (dim * 16 + 16 + 16 * dim)
    router, out_bias = dim * 12, dim
    assert counts["total"] == shared + routed_total + router + out_bias == sum(p.numel() for p in layer.parameters())
    assert counts["activated"] == shared + routed_active + router + out_bias
    layer.top_k = 0
    assert count_params(layer)["activated"] == shared + router + out_bias


def test_flux_moe_model_activated_by_hand():
    cls = flux_moe_class()
    dense = tiny_dense()
    model = cls(**TINY_CONFIG, moe=LAYOUT_1S12E2A, moe_locations=LOCATIONS)
    counts = count_params(model)
    layers = [m for m in model.modules() if isinstance(m, MoEFeedForward)]
    assert len(layers) == 2 * TINY_CONFIG["num_layers"] + TINY_CONFIG["num_single_layers"]
    skipped = sum(total - active for total, active in map(routed_params, layers))
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["activated"] == counts["total"] - skipped
    assert counts["activated"] < counts["total"]
    # 1S12E2A keeps FFN weights (+ routers) and activates 1.5/4 of them
    dense_ffn = count_params(dense)["by_component"]["ffn"]["total"]
    ffn = counts["by_component"]["ffn"]
    routers = sum(layer.router.weight.numel() for layer in layers)
    assert ffn["total"] == dense_ffn + routers
    assert counts["by_component"]["attention"] == count_params(dense)["by_component"]["attention"]

    image, text = 64, 16
    d, e = 64, 12
    fs, fe = 64, 16
    per_token = 2 * (2 * d * fs) + 2 * d * e + 2 * 2 * (2 * d * fe)  # shared, router, top-2 experts
    dense_per_token = 2 * 2 * d * 4 * d
    tokens = TINY_CONFIG["num_layers"] * (image + text) + TINY_CONFIG["num_single_layers"] * (image + text)
    expected = hand_flops(TINY_CONFIG, image, text) + tokens * (per_token - dense_per_token)
    assert flops_per_image(model, image_tokens=image, text_len=text)["total"] == expected


@pytest.mark.parametrize("stream", ["double", "single", "both"])
def test_mob_activated_counts_active_fraction(stream):
    cls = flux_moe_class()
    mob = MoBConfig(stream=stream, group_size=2, active=1).to_dict()
    model = cls(**TINY_CONFIG, mob=mob)
    dense = count_params(tiny_dense())
    counts = count_params(model)
    grouped = {"double": model.transformer_blocks[:2], "single": model.single_transformer_blocks}
    skipped = sum(
        sum(p.numel() for p in block.parameters()) // 2
        for name, blocks in grouped.items()
        if stream in (name, "both")
        for block in blocks
    )
    routers = sum(p.numel() for p in model.mob_groups.parameters())
    assert counts["total"] == dense["total"] + routers
    assert counts["activated"] == dense["total"] + routers - skipped
    assert counts["by_component"]["mob_routers"] == {"total": routers, "activated": routers}

    image, text = 64, 16
    flops = flops_per_image(model, image_tokens=image, text_len=text)["total"]
    assert flops < hand_flops(TINY_CONFIG, image, text)
    model.mob_groups = None
    assert flops_per_image(model, image_tokens=image, text_len=text)["total"] == hand_flops(TINY_CONFIG, image, text)


def test_flux_dev_moe_and_mob_on_meta():
    cls = flux_moe_class()
    with torch.device("meta"):
        moe = cls(**FLUX_DEV_CONFIG, moe=LAYOUT_1S12E2A, moe_locations=LOCATIONS)
    counts = count_params(moe)
    dense_total, dense_ffn = 11_901_408_320, 5_738_858_496
    routers = 76 * 3072 * 12
    assert counts["total"] == dense_total + routers
    # 76 layers each skip 10 of 12 experts of width 768
    assert counts["activated"] == dense_total + routers - 76 * 10 * (2 * 3072 * 768 + 768)
    # docs/design.md §2.9: activated ≈ 11.90 − 0.625·5.74 ≈ 8.3B with the AdaLN modulation counted
    assert counts["activated"] == pytest.approx(dense_total - 0.625 * dense_ffn, rel=1e-3)


def test_resolution_arguments():
    assert image_tokens_for(1024, 1024) == 4096
    assert image_tokens_for(512, 768) == 32 * 48
    model = tiny_dense()
    with pytest.raises(ValueError, match="image_tokens"):
        flops_per_image(model, height=32, width=32, image_tokens=64)
    with pytest.raises(ValueError, match="image_tokens"):
        flops_per_image(model)
    with pytest.raises(ValueError, match="latent_downsample"):
        flops_per_image(model, height=1000, width=1024)
    assert flux_config("tiny") == TINY_CONFIG and flux_config("tiny") is not TINY_CONFIG
    with pytest.raises(ValueError, match="preset"):
        flux_config("flux-pro")


@pytest.mark.parametrize("preset", ["dit-s-mini", "dsmoe-s-e48-mini", "jitmoe-mini"])
def test_dit_params_split_into_components_and_match_param_counts(preset):
    with torch.device("meta"):
        model = DiT(dit_config(preset))
    counts, reference = count_params(model), param_counts(model)
    assert (counts["total"], counts["activated"]) == (reference["total"], reference["activated"])
    by = counts["by_component"]
    d, blocks = model.cfg.hidden, model.cfg.depth
    assert by["adaln_modulation"]["total"] == blocks * (d * 6 * d + 6 * d) + d * 2 * d + 2 * d
    assert by["attention"]["total"] == blocks * sum(p.numel() for p in model.blocks[0].attn.parameters())
    assert by["ffn"]["total"] == sum(p.numel() for b in model.blocks for p in b.ffn.parameters())
    assert by["mob_routers"]["total"] == 0
    with pytest.raises(ValueError, match="image_size"):
        flops_per_image(model, height=32, width=32)
    with pytest.raises(ValueError, match="always has 64"):
        flops_per_image(model, image_tokens=16)

"""Dense FLUX → MoE conversion: exactness with all experts on, locations, single-block split, errors, save/load."""

import pytest
import torch
from conftest import TINY, D, F, dense_model  # noqa: E402,F401
from diffusers.models.attention import FeedForward
from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock

from src.models.convert import ConversionConfig, convert_flux_to_moe
from src.models.flux_moe import FluxMoESingleTransformerBlock, FluxMoETransformer2DModel, moe_summary, set_top_k
from src.models.moe import MoEFeedForward, moe_layers
from src.models.taylor import router_centroids


def inputs(guidance: bool = False, seed: int = 1, batch: int = 2) -> dict:
    g = torch.Generator().manual_seed(seed)
    image_len, text_len = 16, 8
    out = dict(
        hidden_states=torch.randn(batch, image_len, 16, generator=g),
        encoder_hidden_states=torch.randn(batch, text_len, 32, generator=g),
        pooled_projections=torch.randn(batch, 16, generator=g),
        timestep=torch.rand(batch, generator=g),
        img_ids=torch.randint(0, 4, (image_len, 3), generator=g).float(),
        txt_ids=torch.zeros(text_len, 3),
    )
    if guidance:
        out["guidance"] = torch.full((batch,), 3.5)
    return out


def run(model, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(**kwargs).sample


def all_experts_on(model) -> None:
    for layer in moe_layers(model):
        layer.top_k = layer.num_experts
        layer.constant_gates = True


@pytest.mark.parametrize("guidance", [False, True])
@pytest.mark.parametrize("assignment", ["interleave", "kmeans"])
def test_all_experts_reproduce_dense(guidance, assignment):
    dense = dense_model(guidance_embeds=guidance)
    x = inputs(guidance)
    moe = convert_flux_to_moe(dense, ConversionConfig(split="random", assignment=assignment, router_init="normal"))
    assert len(moe_layers(moe)) == 3 * 2
    all_experts_on(moe)
    expected = run(dense, **x)
    assert expected.abs().max() > 0.1
    assert (run(moe, **x) - expected).abs().max() <= 1e-5


def test_top2_layout_runs_and_routes():
    dense = dense_model()
    x = inputs()
    moe = convert_flux_to_moe(dense, ConversionConfig(split="random", router_init="normal"))
    summary = moe_summary(moe)
    assert summary["layout"] == "1S12E2A" and (summary["shared_width"], summary["expert_width"]) == (F // 4, F // 16)
    out = moe.train()(**x).sample
    assert out.shape == x["hidden_states"].shape and torch.isfinite(out).all()
    # Only 2 of 12 routed experts run, so the output differs from the dense one.
    assert (out.detach() - run(dense, **x)).abs().max() > 1e-4
    assert all(layer.aux_loss > 0 for layer in moe_layers(moe))
    out.square().mean().backward()
    assert all(layer.router.weight.grad.abs().sum() > 0 for layer in moe_layers(moe))
    # Each token picks 2 experts: image (2x16), text (2x8) and joint (2x24) token counts per layer.
    tokens = [32, 16, 32, 16, 48, 48]
    assert [int(layer.last_counts.sum()) for layer in moe_layers(moe)] == [2 * t for t in tokens]


def test_dense_structure_forward_is_bit_identical():
    dense = dense_model(guidance_embeds=True)
    model = FluxMoETransformer2DModel(**{**TINY, "guidance_embeds": True}).eval()
    model.load_state_dict(dense.state_dict())
    x = inputs(guidance=True)
    assert torch.equal(run(model, **x), run(dense, **x))
    dense.enable_gradient_checkpointing()
    model.enable_gradient_checkpointing()
    assert torch.equal(model(**x).sample, dense(**x).sample)


@pytest.mark.parametrize("locations", [["ff"], ["ff_context"], ["single"], ["ff", "single"]])
def test_locations_are_switchable(locations):
    dense = dense_model()
    moe = convert_flux_to_moe(dense, ConversionConfig(split="contiguous", locations=locations))
    for block in moe.transformer_blocks:
        for loc in ("ff", "ff_context"):
            assert isinstance(getattr(block, loc), MoEFeedForward if loc in locations else FeedForward)
    single_cls = FluxMoESingleTransformerBlock if "single" in locations else FluxSingleTransformerBlock
    assert all(type(block) is single_cls for block in moe.single_transformer_blocks)
    assert moe.config.moe_locations == locations
    all_experts_on(moe)
    x = inputs()
    assert (run(moe, **x) - run(dense, **x)).abs().max() <= 1e-5


def test_single_block_split_is_exact():
    dense = dense_model()
    moe = convert_flux_to_moe(dense, ConversionConfig(split="random", locations=["single"], assignment="random"))
    all_experts_on(moe)
    dense_block, moe_block = dense.single_transformer_blocks[1], moe.single_transformer_blocks[1]
    assert torch.equal(moe_block.attn_out.weight, dense_block.proj_out.weight[:, :D])
    assert torch.equal(moe_block.attn_out.bias, dense_block.proj_out.bias)
    assert moe_block.mlp.out_bias is None
    g = torch.Generator().manual_seed(3)
    hidden, context, temb = torch.randn(2, 12, D, generator=g), torch.randn(2, 5, D, generator=g), torch.randn(2, D)
    rope = dense.pos_embed(torch.randint(0, 4, (17, 3), generator=g).float())
    with torch.no_grad():
        expected = dense_block(hidden, context, temb, rope)
        got = moe_block(hidden, context, temb, rope)
    for e, o in zip(expected, got):
        assert e.shape == o.shape and (e - o).abs().max() <= 1e-5


def test_router_inits():
    dense = dense_model()
    moe = convert_flux_to_moe(dense, ConversionConfig(split="random", router_init="centroids", locations=["ff"]))
    layer = moe.transformer_blocks[0].ff
    # Recover each expert's neurons from its up-projection columns and compare with the centroid definition.
    up = dense.transformer_blocks[0].ff.net[0].proj.weight
    idx = torch.stack([(layer.w_up[e].t()[:, None, :] == up[None]).all(-1).nonzero()[:, 1] for e in range(12)])
    assert idx.shape == (12, F // 16)
    assert torch.allclose(layer.router.weight, router_centroids(up, idx))
    zeros = convert_flux_to_moe(dense, ConversionConfig(split="random", locations=["ff"], router_init="zeros"))
    assert torch.count_nonzero(zeros.transformer_blocks[0].ff.router.weight) == 0


def test_bad_inputs_name_the_field():
    with pytest.raises(ValueError, match="layout"):
        ConversionConfig(layout="1S4E5A")
    with pytest.raises(ValueError, match="layout"):
        ConversionConfig(layout="12 experts")
    with pytest.raises(ValueError, match="locations"):
        ConversionConfig(locations=["mlp"])
    with pytest.raises(ValueError, match="assignment"):
        ConversionConfig(assignment="best")
    dense = dense_model()
    with pytest.raises(ValueError, match="layout"):  # 96 routed neurons don't split into 7 experts
        convert_flux_to_moe(dense, ConversionConfig(layout="1S7E2A", split="random"))
    with pytest.raises(ValueError, match="shared_fraction"):  # 0.3 x 128 is not a whole width
        convert_flux_to_moe(dense, ConversionConfig(shared_fraction=0.3, split="random"))
    with pytest.raises(ValueError, match="split"):
        convert_flux_to_moe(dense, ConversionConfig())  # Taylor split without scores
    with pytest.raises(ValueError, match="locations"):
        convert_flux_to_moe(dense_model(num_single_layers=0), ConversionConfig(split="random"))
    moe = convert_flux_to_moe(dense, ConversionConfig(split="random", locations=["ff"]))
    with pytest.raises(ValueError, match="top_k"):
        set_top_k(moe, 13)
    with pytest.raises(ValueError, match="moe_locations"):
        FluxMoETransformer2DModel(**TINY, moe_locations=["ff"])
    with pytest.raises(ValueError, match="moe_locations"):
        FluxMoETransformer2DModel(**TINY, moe=dict(moe.config.moe), moe_locations=["attn"])


def test_save_and_load_round_trip(tmp_path):
    dense = dense_model(guidance_embeds=True)
    cfg = ConversionConfig(split="random", router_init="normal", balance="aux_free", locations=["ff", "single"])
    moe = convert_flux_to_moe(dense, cfg).eval()
    moe.transformer_blocks[0].ff.expert_bias.copy_(torch.linspace(-0.1, 0.1, 12))
    x = inputs(guidance=True)
    moe.save_pretrained(tmp_path / "k2")
    loaded = FluxMoETransformer2DModel.from_pretrained(tmp_path / "k2").eval()
    assert loaded.config.moe_locations == ["ff", "single"]
    assert torch.equal(run(loaded, **x), run(moe, **x))

    set_top_k(moe, 5)
    moe.save_pretrained(tmp_path / "k5")
    loaded = FluxMoETransformer2DModel.from_pretrained(tmp_path / "k5").eval()
    assert {layer.top_k for layer in moe_layers(loaded)} == {5}
    assert torch.equal(run(loaded, **x), run(moe, **x))


def test_mob_groups_run_inside_the_forward(tmp_path):
    dense = dense_model(num_single_layers=4)
    moe = convert_flux_to_moe(dense, ConversionConfig(split="random"))
    config = {k: v for k, v in moe.config.items() if not k.startswith("_")}
    x = inputs()
    # All m blocks of each group active: the MoB model equals the model without groups.
    full = FluxMoETransformer2DModel(**{**config, "mob": dict(stream="single", group_size=2, active=2)}).eval()
    assert [(g.stream, g.start, g.size) for g in full.mob_groups] == [("single", 0, 2), ("single", 2, 2)]
    full.load_state_dict(moe.state_dict(), strict=False)
    assert torch.equal(run(full, **x), run(moe, **x))

    sparse = FluxMoETransformer2DModel(**{**config, "mob": dict(stream="single", group_size=2, active=1)}).eval()
    sparse.load_state_dict(full.state_dict())
    out = run(sparse, **x)
    assert (out - run(moe, **x)).abs().max() > 1e-4
    assert all(g.last_choice.sum(1).eq(1).all() for g in sparse.mob_groups)
    sparse.save_pretrained(tmp_path)
    assert torch.equal(run(FluxMoETransformer2DModel.from_pretrained(tmp_path).eval(), **x), out)

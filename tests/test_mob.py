"""Mixture of Blocks: per-sample routing, exactness, gather path vs masked reference, gradients, validation."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.transformers.transformer_flux import (
    FluxPosEmbed,
    FluxSingleTransformerBlock,
    FluxTransformerBlock,
)
from torch import nn

from src.models.mob import (
    MoBConfig,
    MoBGroup,
    active_blocks,
    build_mob_groups,
    group_output_blocks,
    group_spans,
    mob_groups,
)

DIM, HEADS, HEAD_DIM = 32, 2, 16
IMG, TXT = 8, 4


def make_blocks(kind: str, count: int, seed: int = 0) -> nn.ModuleList:
    torch.manual_seed(seed)
    cls = FluxTransformerBlock if kind == "double" else FluxSingleTransformerBlock
    blocks = nn.ModuleList(cls(DIM, HEADS, HEAD_DIM) for _ in range(count))
    # AdaLN-zero blocks start as near-identity only through the modulation; scale it up so blocks differ clearly
    for block in blocks:
        for p in block.parameters():
            p.data.normal_(0, 0.1)
    return blocks


def make_inputs(batch: int = 6, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, IMG, DIM, generator=g)
    encoder = torch.randn(batch, TXT, DIM, generator=g)
    temb = torch.randn(batch, DIM, generator=g)
    rope = FluxPosEmbed(theta=10000, axes_dim=[4, 6, 6])(torch.randn(TXT + IMG, 3, generator=g))
    return hidden, encoder, temb, rope


def run_dense(blocks, hidden, encoder, temb, rope):
    for block in blocks:
        encoder, hidden = block(hidden, encoder, temb, rope)
    return encoder, hidden


def make_group(cfg: MoBConfig, seed: int = 2) -> MoBGroup:
    torch.manual_seed(seed)
    return build_mob_groups(cfg, num_double=cfg.group_size, num_single=cfg.group_size, dim=DIM)[0]


def masked_reference(group: MoBGroup, blocks, hidden, encoder, temb, rope):
    """Every block on the whole batch, unselected samples masked back: the slow semantics MoB must match."""
    choice, excess = group.route(hidden, encoder, temb)
    for i, block in enumerate(blocks):
        enc_out, hid_out = block(hidden, encoder, temb, rope)
        r = (1.0 + excess[:, i])[:, None, None]
        keep = choice[:, i][:, None, None]
        hidden = torch.where(keep, hidden + r * (hid_out - hidden), hidden)
        encoder = torch.where(keep, encoder + r * (enc_out - encoder), encoder)
    return encoder, hidden


def test_routing_is_per_sample():
    cfg = MoBConfig(stream="single", group_size=4, active=2, alpha=0.0)
    group = make_group(cfg)
    hidden, encoder, temb, rope = make_inputs(batch=2)
    temb[1] = -temb[0]
    direction = torch.nn.functional.layer_norm(temb[0], (DIM,))
    with torch.no_grad():
        group.router_y.weight.zero_()
        group.router_y.weight[0] = direction
        group.router_y.weight[3] = -direction
        group(make_blocks("single", 4), hidden, encoder, temb, rope)
    expected = torch.tensor([[True, True, False, False], [False, False, True, True]])
    assert torch.equal(group.last_choice, expected)
    assert group.last_scores.shape == (2, 4)


@pytest.mark.parametrize("selection", ["window", "topk"])
def test_each_sample_runs_active_blocks(selection):
    cfg = MoBConfig(group_size=4, active=2, selection=selection, router_init="normal", router_init_std=1.0)
    group = make_group(cfg)
    hidden, encoder, temb, rope = make_inputs(batch=16)
    with torch.no_grad():
        group(make_blocks("single", 4), hidden, encoder, temb, rope)
    choice = group.last_choice
    assert (choice.sum(1) == 2).all()
    assert len({tuple(row.tolist()) for row in choice}) > 1, "all samples picked the same blocks"
    if selection == "window":
        first = choice.int().argmax(1)
        assert choice[torch.arange(16), first + 1].all(), "window selection must pick adjacent blocks"


@pytest.mark.parametrize(
    ("kind", "selection", "gate", "init"),
    [
        ("single", "window", "straight_through", "normal"),
        ("double", "topk", "straight_through", "normal"),
        ("single", "window", "score", "normal"),
        ("double", "topk", "score", "zeros"),
    ],
)
def test_all_blocks_active_equals_dense(kind, selection, gate, init):
    # κ = m: straight-through weights are 1 in value; "score" weights are n·p = 1 when there is one window
    # (window selection) or the router is uniform (zero init)
    cfg = MoBConfig(
        stream=kind,
        group_size=3,
        active=3,
        selection=selection,
        gate=gate,
        router_init=init,
        router_init_std=1.0,
    )
    group = make_group(cfg)
    blocks = make_blocks(kind, 3)
    inputs = make_inputs()
    enc_ref, hid_ref = run_dense(blocks, *inputs)
    enc, hid = group(blocks, *inputs)
    assert torch.equal(hid, hid_ref) and torch.equal(enc, enc_ref)
    with torch.no_grad():
        enc, hid = group(blocks, *inputs)
    assert torch.equal(hid, hid_ref) and torch.equal(enc, enc_ref)


@pytest.mark.parametrize(
    ("kind", "selection", "gate"),
    [("single", "window", "straight_through"), ("double", "topk", "score"), ("double", "window", "score")],
)
def test_gather_path_equals_masked_reference(kind, selection, gate):
    cfg = MoBConfig(
        stream=kind,
        group_size=4,
        active=2,
        selection=selection,
        gate=gate,
        router_init="normal",
        router_init_std=1.0,
    )
    group = make_group(cfg)
    blocks = make_blocks(kind, 4)
    inputs = make_inputs(batch=8)
    params = list(group.parameters()) + list(blocks.parameters())

    def loss_and_grads(outputs):
        enc, hid = outputs
        grads = torch.autograd.grad(hid.square().mean() + enc.square().mean(), params, allow_unused=True)
        return enc, hid, [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]

    enc, hid, grads = loss_and_grads(group(blocks, *inputs))
    assert not group.last_choice.all(dim=0).any(), "test needs blocks that only some samples run"
    enc_ref, hid_ref, grads_ref = loss_and_grads(masked_reference(group, blocks, *inputs))
    torch.testing.assert_close(hid, hid_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(enc, enc_ref, atol=1e-5, rtol=1e-5)
    for grad, grad_ref in zip(grads, grads_ref):
        torch.testing.assert_close(grad, grad_ref, atol=1e-5, rtol=1e-4)


def test_blocks_see_only_their_samples():
    cfg = MoBConfig(group_size=4, active=1, router_init="normal", router_init_std=1.0)
    group = make_group(cfg)
    blocks = make_blocks("single", 4)
    seen = []
    for block in blocks:
        block.register_forward_hook(
            lambda mod, args, kwargs, out: seen.append(kwargs["hidden_states"].shape[0]), with_kwargs=True
        )
    with torch.no_grad():
        group(blocks, *make_inputs(batch=12))
    counts = group.last_choice.sum(0)
    assert seen == [c for c in counts.tolist() if c > 0]
    assert sum(seen) == 12


@pytest.mark.parametrize(("selection", "gate"), [("window", "straight_through"), ("topk", "score")])
def test_router_gets_gradients(selection, gate):
    cfg = MoBConfig(group_size=4, active=2, selection=selection, gate=gate, router_init="zeros")
    group = make_group(cfg)
    blocks = make_blocks("single", 4)
    enc, hid = group(blocks, *make_inputs())
    (hid.square().mean() + enc.square().mean()).backward()
    assert group.router_x.weight.grad is not None and group.router_x.weight.grad.abs().sum() > 0
    assert group.router_y.weight.grad is not None and group.router_y.weight.grad.abs().sum() > 0
    unused = ~group.last_choice.any(0)
    for i, block in enumerate(blocks):
        grads = [p.grad for p in block.parameters()]
        assert all(g is None for g in grads) == bool(unused[i])


def test_active_can_change_at_inference():
    cfg = MoBConfig(group_size=4, active=3, router_init="normal", router_init_std=1.0)
    group = make_group(cfg)
    group.active = 1
    with torch.no_grad():
        group(make_blocks("single", 4), *make_inputs())
    assert (group.last_choice.sum(1) == 1).all()
    group.active = 5
    with pytest.raises(ValueError, match="active"):
        group(make_blocks("single", 4), *make_inputs())


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"active": 5, "group_size": 4}, "active"),
        ({"active": 0}, "active"),
        ({"stream": "all"}, "stream"),
        ({"selection": "best"}, "selection"),
        ({"gate": "hard"}, "gate"),
        ({"alpha": 1.5}, "alpha"),
        ({"first": 3, "last": 1}, "last"),
    ],
)
def test_config_validation_names_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        MoBConfig(**kwargs)


def test_group_larger_than_blocks_names_field():
    with pytest.raises(ValueError, match="group_size=5"):
        build_mob_groups(MoBConfig(stream="single", group_size=5, active=2), 19, 4, DIM)
    with pytest.raises(ValueError, match="group_size=4"):
        build_mob_groups(MoBConfig(stream="double", group_size=4, active=2, first=17), 19, 38, DIM)
    with pytest.raises(ValueError, match="last=40"):
        build_mob_groups(MoBConfig(stream="single", last=40), 19, 38, DIM)
    with pytest.raises(ValueError, match="size"):
        make_group(MoBConfig(group_size=3, active=2))(make_blocks("single", 2), *make_inputs())


def test_group_layout_on_flux_dev_shape():
    cfg = MoBConfig(stream="single", group_size=4, active=2)
    spans = group_spans(cfg, 19, 38)
    # 38 = 2 + 9·4: the two leftover blocks are the stream's first ones
    assert [start for _, start, _ in spans] == list(range(2, 38, 4))
    assert group_output_blocks(cfg, 19, 38)[-1] == ("single", 37)
    assert active_blocks(cfg, 19, 38) == (19, 38 - 9 * 2)
    both = MoBConfig(stream="both", group_size=2, active=1, first=10, last=17)
    assert active_blocks(both, 19, 38) == (19 - 4, 38 - 4)
    assert group_output_blocks(both, 19, 38)[:2] == [("double", 11), ("double", 13)]
    groups = build_mob_groups(both, 19, 38, DIM)
    assert [(g.stream, g.start, g.size) for g in groups] == group_spans(both, 19, 38)
    holder = nn.Module()
    holder.mob_groups = groups
    assert mob_groups(holder) == list(groups)


def test_config_dict_round_trip():
    cfg = MoBConfig(stream="both", group_size=3, active=1, last=8, selection="topk")
    assert MoBConfig(**cfg.to_dict()) == cfg
    assert len(build_mob_groups(cfg.to_dict(), 9, 9, DIM)) == 6


def test_through_flux_moe_model():
    flux_moe = pytest.importorskip("src.models.flux_moe")
    from diffusers import FluxTransformer2DModel

    from src.models.presets import TINY_CONFIG

    torch.manual_seed(0)
    dense = FluxTransformer2DModel(**TINY_CONFIG)
    mob = MoBConfig(stream="both", group_size=2, active=2, router_init="normal", router_init_std=1.0)
    model = flux_moe.FluxMoETransformer2DModel(**TINY_CONFIG, mob=mob.to_dict())
    missing, unexpected = model.load_state_dict(dense.state_dict(), strict=False)
    assert not unexpected and all(name.startswith("mob_groups.") for name in missing)
    g = torch.Generator().manual_seed(0)
    batch, image, text = 4, 16, 8
    inputs = {
        "hidden_states": torch.randn(batch, image, TINY_CONFIG["in_channels"], generator=g),
        "encoder_hidden_states": torch.randn(batch, text, TINY_CONFIG["joint_attention_dim"], generator=g),
        "pooled_projections": torch.randn(batch, TINY_CONFIG["pooled_projection_dim"], generator=g),
        "timestep": torch.rand(batch, generator=g),
        "img_ids": torch.randn(image, 3, generator=g),
        "txt_ids": torch.zeros(text, 3),
    }
    with torch.no_grad():
        assert torch.equal(model(**inputs).sample, dense(**inputs).sample)
    groups = mob_groups(model)
    assert len(groups) == 1 + 2
    outputs = []
    groups[-1].register_forward_hook(lambda mod, args, out: outputs.append(out[1]))
    for group in groups:
        group.active = 1
    model(**inputs).sample.square().mean().backward()
    assert all((group.last_choice.sum(1) == 1).all() for group in groups)
    assert outputs[0].shape == (batch, image, 64)
    assert all(group.router_y.weight.grad.abs().sum() > 0 for group in groups)

"""StudentStructure: the flat config keys parsed into small config objects, and the model built from them."""

import pytest
import torch
from conftest import TINY, F

from src.models.flux_moe import FluxMoETransformer2DModel, set_top_k
from src.models.mob import MoBConfig, mob_groups
from src.models.moe import MoEFeedForward
from src.models.student_structure import DepthPruning, MoEPlacement, StudentStructure, WidthPruning

MOE = {"num_shared": 1, "num_experts": 4, "top_k": 2}


def parse(**keys):
    flat = dict(moe=None, moe_locations=None, mob=None, ffn_widths=None, kept_double=None, kept_single=None)
    return StudentStructure.from_config(**{**flat, **keys}, num_layers=2, num_single_layers=2, dense_width=F)


def test_dense_keys_parse_to_the_dense_structure():
    structure = parse()
    assert structure == StudentStructure()


def test_moe_widths_resolve_from_the_dense_width_and_locations_default_to_all():
    structure = parse(moe=MOE)
    assert isinstance(structure.moe, MoEPlacement) and structure.moe.locations == ("ff", "ff_context", "single")
    # 1 shared expert of F/4 and 4 routed experts sharing the rest (layout_widths): 32 + 4 × 24 = 128
    assert structure.moe.layer.shared_width == F // 4
    assert structure.moe.layer.shared_width + 4 * structure.moe.layer.expert_width == F


def test_every_change_gets_its_object():
    structure = parse(
        moe=MOE,
        moe_locations=["single"],
        ffn_widths={"ff": 48, "ff_context": 48},
        kept_double=[0, 2],
        kept_single=[1, 3],
        mob={"stream": "single", "group_size": 2, "active": 1},
    )
    assert structure.moe.locations == ("single",)
    assert structure.width == WidthPruning({"ff": 48, "ff_context": 48})
    assert structure.depth == DepthPruning((0, 2), (1, 3))
    assert structure.mob == MoBConfig(stream="single", group_size=2, active=1)


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"moe_locations": ["ff"]}, "moe_locations=\\['ff'\\]: needs `moe`"),
        ({"moe": MOE, "moe_locations": ["attn"]}, "moe_locations: unknown location 'attn'"),
        ({"ffn_widths": {"attn": 4}}, "ffn_widths: unknown location 'attn'"),
        ({"moe": MOE, "ffn_widths": {"ff": 4}}, "ffn_widths: location 'ff' is also in moe_locations"),
        ({"ffn_widths": {"ff": 0}}, "ffn_widths\\['ff'\\]=0: must be a positive integer"),
        ({"kept_double": [0]}, "kept_double: has 1 entries, the model has 2 blocks"),
        ({"moe": {**MOE, "top_k": 9}}, "top_k"),
    ],
)
def test_bad_keys_name_the_key(keys, message):
    with pytest.raises(ValueError, match=message):
        parse(**keys)


def test_the_model_is_built_from_its_structure():
    model = FluxMoETransformer2DModel(
        **TINY,
        moe=MOE,
        moe_locations=["ff", "single"],
        ffn_widths={"ff_context": 40},
        mob={"stream": "single", "group_size": 2, "active": 1},
    )
    structure = model.structure
    assert structure.moe.locations == ("ff", "single") and structure.width.ffn_widths == {"ff_context": 40}
    for block in model.transformer_blocks:
        assert isinstance(block.ff, MoEFeedForward) and block.ff.cfg == structure.moe.layer
        assert block.ff_context.net[0].proj.out_features == 40
    assert all(isinstance(block.mlp, MoEFeedForward) for block in model.single_transformer_blocks)
    assert [(g.stream, g.size, g.active) for g in mob_groups(model)] == [("single", 2, 1)]
    # the registered config still holds the flat JSON keys diffusers saves, and rebuilds the same structure
    again = FluxMoETransformer2DModel(**{k: v for k, v in model.config.items() if not k.startswith("_")})
    assert again.structure == structure


def test_set_top_k_updates_the_structure_with_the_config():
    torch.manual_seed(0)
    model = FluxMoETransformer2DModel(**TINY, moe=MOE)
    set_top_k(model, 1)
    assert model.structure.moe.layer.top_k == 1 and model.config.moe["top_k"] == 1

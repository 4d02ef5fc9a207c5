"""ConversionConfig's routing fields reach MoEConfig (z-loss, aux-free bias rate, up-projection biases), and the
fields added later leave existing stage fingerprints alone while at their defaults."""

import pytest
import torch
from diffusers import FluxTransformer2DModel

from src.models.convert import ConversionConfig, convert_flux_to_moe
from src.models.moe import MoEConfig, moe_layers
from src.models.presets import TINY_CONFIG
from src.training.experiment import LATER_CONVERSION_FIELDS


def test_defaults_match_moe_config_and_values_pass_through():
    for name in ("aux_loss_weight", "z_loss_weight", "bias_update_rate", "up_bias"):
        assert getattr(ConversionConfig(), name) == getattr(MoEConfig(), name), name
    assert LATER_CONVERSION_FIELDS == {k: getattr(ConversionConfig(), k) for k in LATER_CONVERSION_FIELDS}
    cfg = ConversionConfig(split="random", z_loss_weight=1e-3, bias_update_rate=5e-3, up_bias=False)
    moe = cfg.moe_config(256)
    assert (moe.z_loss_weight, moe.bias_update_rate, moe.up_bias) == (1e-3, 5e-3, False)
    with pytest.raises(ValueError, match="bias_update_rate"):
        ConversionConfig(split="random", bias_update_rate=-1.0)


def test_a_student_without_up_biases_converts():
    torch.manual_seed(0)
    dense = FluxTransformer2DModel(**TINY_CONFIG)
    student = convert_flux_to_moe(dense, ConversionConfig(layout="1S4E2A", split="random", up_bias=False))
    layers = moe_layers(student)
    assert layers and all(m.b_up is None and m.shared_up.bias is None for m in layers)

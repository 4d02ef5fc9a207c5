"""A converted MoE transformer inside a tiny offline `diffusers.FluxPipeline`."""

import torch
from diffusers import FluxTransformer2DModel

from src.models.convert import ConversionConfig, convert_flux_to_moe
from src.models.moe import moe_layers
from src.models.tiny_pipeline import TEXT_LEN, build_tiny_pipeline, tiny_transformer_config

PROMPTS = ["a red cube", "two green balls"]


def generate(pipe, height: int = 32, width: int = 48):
    return pipe(
        PROMPTS,
        height=height,
        width=width,
        num_inference_steps=2,
        guidance_scale=3.5,
        max_sequence_length=TEXT_LEN,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images


def test_moe_transformer_generates_in_flux_pipeline():
    torch.manual_seed(0)
    dense = FluxTransformer2DModel(**tiny_transformer_config(guidance_embeds=True)).eval()
    moe = convert_flux_to_moe(dense, ConversionConfig(split="random", router_init="normal"))
    images = generate(build_tiny_pipeline(moe, seed=1))
    assert images.shape == (2, 32, 48, 3)
    assert ((images >= 0) & (images <= 1)).all()

    # With every expert on and gates of 1, the pipeline's images equal the dense pipeline's.
    for layer in moe_layers(moe):
        layer.top_k, layer.constant_gates = layer.num_experts, True
    dense_images = generate(build_tiny_pipeline(dense, seed=1))
    assert abs(generate(build_tiny_pipeline(moe, seed=1)) - dense_images).max() <= 1e-4
    assert abs(images - dense_images).max() > 0  # top-2 routing changed the result

"""The student's forward is a copy of diffusers' ``FluxTransformer2DModel.forward`` (src/models/flux_moe.py). With
the dense structure it must stay bit-identical, outputs and gradients, so a diffusers upgrade that changes FLUX's
forward fails here first (pyproject pins diffusers >= 0.37: the fork imports ``apply_lora_scale``)."""

import pytest
import torch
from conftest import TINY, dense_model

from src.models.flux_moe import FluxMoETransformer2DModel


def inputs(batch: int = 2, batched_ids: bool = False) -> dict:
    g = torch.Generator().manual_seed(3)
    image_len, text_len = 16, 8
    img_ids = torch.randint(0, 4, (image_len, 3), generator=g).float()
    txt_ids = torch.zeros(text_len, 3)
    if batched_ids:  # deprecated 3D ids: both take the first sample's
        img_ids, txt_ids = img_ids.expand(batch, -1, -1), txt_ids.expand(batch, -1, -1)
    return dict(
        hidden_states=torch.randn(batch, image_len, 16, generator=g),
        encoder_hidden_states=torch.randn(batch, text_len, 32, generator=g),
        pooled_projections=torch.randn(batch, 16, generator=g),
        timestep=torch.rand(batch, generator=g),
        img_ids=img_ids,
        txt_ids=txt_ids,
        guidance=torch.full((batch,), 3.5),
    )


def pair() -> tuple[torch.nn.Module, torch.nn.Module]:
    dense = dense_model(guidance_embeds=True)
    fork = FluxMoETransformer2DModel(**{**TINY, "guidance_embeds": True}).eval()
    fork.load_state_dict(dense.state_dict())
    return dense, fork


@pytest.mark.parametrize("batched_ids", [False, True])
def test_the_forked_forward_and_its_gradients_equal_diffusers_bit_for_bit(batched_ids):
    dense, fork = pair()
    x = inputs(batched_ids=batched_ids)
    out_dense, out_fork = dense(**x).sample, fork(**x).sample
    assert torch.equal(out_fork, out_dense)
    out_dense.square().mean().backward()
    out_fork.square().mean().backward()
    grads = dict(fork.named_parameters())
    for name, p in dense.named_parameters():
        assert torch.equal(grads[name].grad, p.grad), name


def test_controlnet_residuals_are_added_where_diffusers_adds_them():
    dense, fork = pair()
    x = inputs()
    g = torch.Generator().manual_seed(4)
    double = [torch.randn(2, 16, 32, generator=g)]  # one sample for 2 double blocks: interval 2
    single = [torch.randn(2, 16, 32, generator=g) for _ in range(2)]
    for repeat in (False, True):
        kwargs = dict(controlnet_block_samples=double, controlnet_single_block_samples=single)
        kwargs["controlnet_blocks_repeat"] = repeat
        with torch.no_grad():
            assert torch.equal(fork(**x, **kwargs).sample, dense(**x, **kwargs).sample)

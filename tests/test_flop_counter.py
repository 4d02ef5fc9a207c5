"""``flops_per_image`` (counted from module names and shapes) against torch's ``FlopCounterMode`` (counted from the
matmuls a forward actually runs) on tiny FLUX teachers, an MoE student and small class-conditional DiT presets
(dense, DSMoE, JiTMoE with in-context class tokens).

Like with like: FlopCounterMode counts mm/addmm/bmm and the fused attention kernels it knows, never the bias add,
norms, activations, softmax or RoPE, which ``flops_per_image`` ignores too (its docstring); a batch of one image
without guidance makes its per-forward count a per-image count. Two things FlopCounterMode does not see, so the
comparisons route around them:
- the CPU's fused attention kernel (``_scaled_dot_product_flash_attention_for_cpu`` has no FLOP formula): the
  forward runs under the math SDPA backend, whose QKᵀ and AV are bmm's;
- ``F.grouped_mm`` (no FLOP formula either), the MoE layer's routed-expert matmul: counted as the MoE layer's
  split-loop fallback (one mm per expert), and on the grouped path as the measured count plus 2·N·k·(up + down
  weights per expert) for the N tokens that reached each MoE layer.
"""

import pytest
import torch
from diffusers import FluxTransformer2DModel
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from src.models.accounting import flops_per_image
from src.models.convert import ConversionConfig, convert_flux_to_moe
from src.models.dit import DiT
from src.models.dit_presets import dit_config
from src.models.flow import image_ids, text_ids
from src.models.moe import moe_layers
from src.models.presets import TEACHER_TINY_CONFIG, TINY_CONFIG

SIDE, TEXT = 4, 7  # a 4×4 token image, 7 text tokens


def _counted(model: torch.nn.Module) -> FlopCounterMode:
    """One forward on random inputs (as ``ShapesPipeline.velocity`` calls the model) under FlopCounterMode."""
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, SIDE * SIDE, cfg.in_channels, generator=g)
    tokens = torch.randn(1, TEXT, cfg.joint_attention_dim, generator=g)
    pooled = torch.randn(1, cfg.pooled_projection_dim, generator=g)
    guidance = torch.tensor([3.5]) if cfg.guidance_embeds else None
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
        model(
            hidden_states=x,
            encoder_hidden_states=tokens,
            pooled_projections=pooled,
            timestep=torch.tensor([0.5]),
            img_ids=image_ids(SIDE, SIDE, x.device),
            txt_ids=text_ids(TEXT, x.device),
            guidance=guidance,
            return_dict=False,
        )
    return counter


def _ours(model: torch.nn.Module) -> dict:
    return flops_per_image(model, image_tokens=SIDE * SIDE, text_len=TEXT)


def _by_op(counter: FlopCounterMode) -> dict[str, int]:
    return {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}


@pytest.mark.parametrize("config", [TINY_CONFIG, TEACHER_TINY_CONFIG], ids=["tiny", "teacher-tiny"])
def test_dense_flux_matches_flop_counter_mode_exactly(config):
    torch.manual_seed(0)
    model = FluxTransformer2DModel(**config).eval()
    counter, ours = _counted(model), _ours(model)
    assert counter.get_total_flops() == ours["total"]
    # attention scores and values (QKᵀ, AV) are the only bmm's; everything else is a linear layer
    assert _by_op(counter)["aten.bmm"] == ours["by_component"]["attention_scores"]


@pytest.fixture(scope="module")
def student():
    torch.manual_seed(0)
    dense = FluxTransformer2DModel(**TINY_CONFIG).eval()
    config = ConversionConfig(layout="1S4E2A", split="random", assignment="random", router_init="normal")
    return convert_flux_to_moe(dense, config).eval()


def test_moe_student_split_loop_matches_flop_counter_mode_exactly(student):
    layers = moe_layers(student)
    try:
        for layer in layers:
            layer.use_grouped_mm = False  # one mm per expert, which FlopCounterMode counts
        counter = _counted(student)
    finally:
        for layer in layers:
            layer.use_grouped_mm = True
    assert counter.get_total_flops() == _ours(student)["total"]


def test_moe_student_grouped_mm_is_missed_by_flop_counter_mode(student):
    layers = moe_layers(student)
    if layers[0].expert_matmul_path(torch.float32) != "torch.nn.functional.grouped_mm":
        pytest.skip("F.grouped_mm is not used on this build")
    tokens: list[tuple[torch.nn.Module, int]] = []
    hooks = [
        layer.register_forward_hook(lambda m, args, out: tokens.append((m, args[0].numel() // args[0].shape[-1])))
        for layer in layers
    ]
    try:
        counter = _counted(student)
    finally:
        for hook in hooks:
            hook.remove()
    assert len(tokens) == len(layers)
    routed = sum(2 * n * m.top_k * (m.w_up[0].numel() + m.w_down[0].numel()) for m, n in tokens)
    assert routed > 0 and "aten._grouped_mm" not in _by_op(counter)
    assert counter.get_total_flops() + routed == _ours(student)["total"]


DIT_PRESETS = {  # small versions of the embedded world's presets: 32×32 RGB, 64 patches, hidden 96
    "dit-s-mini": {"depth": 2},
    "dsmoe-s-e48-mini": {"depth": 2},
    "jitmoe-mini": {"depth": 3, "in_context_start": 1},  # 4 class tokens join from block 1 on
}


@pytest.mark.parametrize("preset", list(DIT_PRESETS))
def test_dit_matches_flop_counter_mode_exactly(preset):
    torch.manual_seed(0)
    model = DiT(dit_config(preset, **DIT_PRESETS[preset])).eval()
    layers = moe_layers(model)
    for layer in layers:
        layer.use_grouped_mm = False  # one mm per expert, which FlopCounterMode counts
    cfg = model.cfg
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, cfg.in_channels, cfg.image_size, cfg.image_size, generator=g)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
        model(z, torch.tensor([0.5]), torch.tensor([3]))
    ours = flops_per_image(model)
    assert (len(layers) > 0) == (cfg.moe is not None)
    assert counter.get_total_flops() == ours["total"]
    assert _by_op(counter)["aten.bmm"] == ours["by_component"]["attention_scores"]
    assert ours["image_tokens"] == cfg.grid**2 and ours["text_tokens"] == 0

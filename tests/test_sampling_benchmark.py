"""benchmarks/sampling.py runs end to end and prints a time ratio next to a FLOP ratio for every model."""

from __future__ import annotations

import re

import torch
from diffusers import FluxTransformer2DModel

from benchmarks import sampling
from src.models.pipeline import SamplingConfig
from src.models.presets import TINY_CONFIG


def test_benchmark_prints_both_ratios_and_the_profile_for_every_model(capsys):
    sampling.main(
        ["--configs", "committed", "--steps", "1", "--batch", "2", "--repeats", "1", "--warmup", "0", "--profile"]
    )
    out = capsys.readouterr().out
    rows = {
        m.group(1): m.groups()[1:]
        for m in re.finditer(
            r"^\| (dense teacher|MoE-L[^|]*|MoE-S[^|]*) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|$",
            out,
            re.M,
        )
    }
    assert len(rows) == 3, out
    flop_ratios = {name.split()[0]: float(values[1]) for name, values in rows.items()}
    # 1S12E2A activates 37.5 % of every FFN; MoB 4→1 also skips 6 of the 8 single blocks
    assert flop_ratios["dense"] == 1.0 and 0.55 < flop_ratios["MoE-L"] < 0.7 and flop_ratios["MoE-S"] < 0.4
    assert all(float(values[3]) > 0 for values in rows.values())  # a measured time ratio per model
    for component in ("attention", "MoE routed expert GEMMs", "MoB routing and gathers", "AdaLN"):
        assert re.search(rf"^\| {re.escape(component)} \|", out, re.M), component


def test_latent_sampler_runs_a_guidance_distilled_model():
    torch.manual_seed(0)
    model = FluxTransformer2DModel(**(TINY_CONFIG | {"guidance_embeds": True, "in_channels": 64})).eval()
    sampler = sampling.LatentSampler(model, image_size=64, sampling=SamplingConfig(steps=2, cfg_scale=1.0), text_len=8)
    first, again = sampler(["a", "b"], [0, 1]), sampler(["a", "b"], [0, 1])
    assert first.shape == (2, 16, 64) and torch.equal(first, again) and torch.isfinite(first).all()

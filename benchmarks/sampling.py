"""Benchmark: seconds per image of the dense teacher and its MoE students under the real sampler, next to FLOPs.

For each model config (the committed teacher, random FLUX configs of hidden 512 and 1024, or FLUX.1-dev widths on a
GPU) the dense model, MoE-L (1S12E2A in every FFN) and MoE-S (MoE-L plus MoB over the single-stream blocks, groups
of 4, one block per sample and step) — and any exported student given with ``--student`` — generate the same
prompts from the same noise with the sampler ``evaluate`` uses (Euler, classifier-free guidance, the model's step
count). Whole sampling calls are timed interleaved (median of ``--repeats``); each row prints the student's time
ratio to the dense model next to its FLOP ratio (``src/models/accounting.py``: activated matmuls and attention).

``--profile`` adds a torch.profiler breakdown of one sampling call per model by component: attention, the MoE
layer's parts (routing, shared expert, routed expert GEMMs, dispatch = sort, gathers, gates and combine), dense
FFNs, AdaLN, MoB routing and gathers, and what no labelled range covers (embedders, sampler arithmetic, Python
between modules). The labels come from hooks installed by this script only, so the models run their normal code.

    python -m benchmarks.sampling --configs committed h512 h1024 --threads 1
    python -m benchmarks.sampling --configs committed --student runs/moe_s/export --profile
    python -m benchmarks.sampling --configs flux-dev --device cuda --dtype bf16     # GPU: 1024², 28 steps

Legend: B batch, L image tokens.
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import FluxTransformer2DModel
from diffusers.models.attention import FeedForward
from diffusers.models.normalization import AdaLayerNormContinuous, AdaLayerNormZero, AdaLayerNormZeroSingle
from diffusers.models.transformers.transformer_flux import FluxAttention, FluxSingleTransformerBlock
from torch import nn

from benchmarks.timing import time_interleaved
from src.models.accounting import flops_per_image
from src.models.convert import ConversionConfig, convert_flux_to_moe
from src.models.flow import fixed_noise, image_ids, ode_sample, text_ids
from src.models.loading import load_transformer
from src.models.mob import MoBConfig, MoBGroup
from src.models.moe import MoEFeedForward
from src.models.pipeline import SamplingConfig, ShapesPipeline
from src.models.presets import FLUX_DEV_CONFIG, TEACHER_TINY_CONFIG
from src.models.student import with_mob

COMMITTED = Path(__file__).resolve().parents[1] / "checkpoints" / "teacher_tiny"
PROMPTS = (
    "a photo of a red circle and a blue square",
    "a photo of three green triangles",
    "a photo of a yellow star left of a purple circle",
    "a photo of two blue squares",
)


@dataclass(frozen=True)
class ModelConfig:
    """One teacher size to benchmark."""

    name: str
    image_size: int
    """Pixels per side (embedded world: 8×8-pixel tokens) or, for FLUX.1-dev, the latent image size."""
    steps: int
    cfg_scale: float
    transformer: dict | None
    """FluxTransformer2DModel kwargs; None = the committed teacher."""
    batch: int
    """Images per sampling call (``--batch`` overrides)."""


def _random_flux(dim: int, double: int, single: int) -> dict:
    heads = dim // 64
    return {
        **TEACHER_TINY_CONFIG,
        "num_layers": double,
        "num_single_layers": single,
        "attention_head_dim": 64,
        "num_attention_heads": heads,
        "axes_dims_rope": (16, 24, 24),
    }


CONFIGS = {
    # 32 px: 16 image tokens, the committed teacher's sampler (20 steps, CFG 2)
    "committed": ModelConfig("committed teacher (hidden 128, 4+8 blocks)", 32, 20, 2.0, None, 8),
    # random configs: fewer steps and images than a real sampling run (each step costs the same; ratios hold)
    "h512": ModelConfig("random FLUX hidden 512, 4+8 blocks", 128, 4, 2.0, _random_flux(512, 4, 8), 2),
    "h1024": ModelConfig("random FLUX hidden 1024, 2+4 blocks", 128, 2, 2.0, _random_flux(1024, 2, 4), 2),
    # FLUX.1-dev: 1024² → 4096 latent tokens, 512 T5 tokens, 28 steps, guidance-distilled (one forward per step)
    "flux-dev": ModelConfig("FLUX.1-dev widths, 1024²", 1024, 28, 1.0, dict(FLUX_DEV_CONFIG), 1),
}


def _teacher(cfg: ModelConfig, device: torch.device, dtype: torch.dtype) -> nn.Module:
    if cfg.transformer is None:
        model = load_transformer(COMMITTED)
    else:
        torch.manual_seed(0)
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # built in the benchmark dtype: FLUX.1-dev in fp32 would take 48 GB first
        try:
            with torch.device(device):
                model = FluxTransformer2DModel(**cfg.transformer)
        finally:
            torch.set_default_dtype(default)
    model = model.to(device)
    return (model if dtype == torch.float32 else model.to(dtype)).eval()


def students(teacher: nn.Module) -> dict[str, nn.Module]:
    """MoE-L (1S12E2A everywhere) and MoE-S (MoE-L + MoB over the single blocks, groups of 4, κ = 1), random
    expert split with a normal router (the speed does not depend on which neurons went where)."""
    conversion = ConversionConfig(layout="1S12E2A", split="random", assignment="random", router_init="normal")
    moe_l = convert_flux_to_moe(teacher, conversion).eval()
    moe_s_base = convert_flux_to_moe(teacher, conversion)
    moe_s = with_mob(moe_s_base, MoBConfig(stream="single", group_size=4, active=1, router_init="normal")).eval()
    return {"MoE-L 1S12E2A": moe_l, "MoE-S 1S12E2A + MoB 4→1": moe_s}


# --- the sampler, for the embedded world (pixel tokens) and for FLUX.1-dev shapes (latent tokens) -------------


class LatentSampler:
    """FLUX.1-dev-shaped sampling: random T5/CLIP stand-ins, packed latents, the same Euler + guidance loop."""

    def __init__(self, model: nn.Module, image_size: int, sampling: SamplingConfig, text_len: int = 512):
        self.model, self.sampling, self.text_len = model, sampling, text_len
        self.side = image_size // 16
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype

    def __call__(self, prompts: list[str], seeds: list[int]) -> torch.Tensor:
        cfg, batch = self.model.config, len(prompts)
        gen = torch.Generator(device="cpu").manual_seed(0)
        tokens = torch.randn(batch, self.text_len, cfg.joint_attention_dim, generator=gen)
        pooled = torch.randn(batch, cfg.pooled_projection_dim, generator=gen)
        tokens, pooled = tokens.to(self.device, self.dtype), pooled.to(self.device, self.dtype)
        img_ids, txt_ids = image_ids(self.side, self.side, self.device), text_ids(self.text_len, self.device)
        noise = fixed_noise((self.side * self.side, cfg.in_channels), seeds, self.device).to(self.dtype)
        guidance = torch.full((batch,), self.sampling.guidance, device=self.device, dtype=self.dtype)

        def velocity(x, sigma, conditional):
            return self.model(
                hidden_states=x,
                encoder_hidden_states=tokens,
                pooled_projections=pooled,
                timestep=sigma,
                img_ids=img_ids,
                txt_ids=txt_ids,
                guidance=guidance if cfg.guidance_embeds else None,
                return_dict=False,
            )[0]

        with torch.inference_mode():
            return ode_sample(velocity, noise, self.sampling.steps, self.sampling.cfg_scale, 3.0)


def _pipeline(model: nn.Module, cfg: ModelConfig, steps: int) -> tuple[object, int, int]:
    """(sampler, image tokens, text tokens) for `model` under `cfg`."""
    sampling = SamplingConfig(steps=steps, cfg_scale=cfg.cfg_scale)
    if cfg.name.startswith("FLUX.1-dev"):
        sampler = LatentSampler(model, cfg.image_size, sampling)
        return sampler, sampler.side**2, sampler.text_len
    pipe = ShapesPipeline(model, image_size=cfg.image_size, sampling=sampling)
    return pipe, pipe.tokens_per_side**2, pipe.text_encoder.cfg.max_tokens


# --- profile by component ------------------------------------------------------------------------------------

MOE_PARTS = ("MoE routing", "MoE shared expert", "MoE routed expert GEMMs")
CATEGORIES = (
    "attention",
    *MOE_PARTS,
    "MoE dispatch (sort, gathers, gates, combine)",
    "dense FFN",
    "AdaLN",
    "MoB routing and gathers",
)


@contextlib.contextmanager
def labelled(model: nn.Module) -> Iterator[None]:
    """Open a profiler range named after each component around its modules' forwards (hooks, this script only)."""
    ranges: dict[int, list] = defaultdict(list)
    handles = []

    def label_of(module: nn.Module) -> str | None:
        if isinstance(module, FluxAttention):
            return "attention"
        if isinstance(module, MoEFeedForward):
            return "MoE dispatch (sort, gathers, gates, combine)"  # what its labelled parts leave
        if isinstance(module, FeedForward):
            return "dense FFN"
        if isinstance(module, (AdaLayerNormZero, AdaLayerNormZeroSingle, AdaLayerNormContinuous)):
            return "AdaLN"
        if isinstance(module, MoBGroup):
            return "MoB routing and gathers"
        return None

    def pre(label):
        def hook(module, args):
            rf = torch.profiler.record_function(label)
            rf.__enter__()
            ranges[id(module)].append(rf)

        return hook

    def post(module, args, output):
        ranges[id(module)].pop().__exit__(None, None, None)

    for module in model.modules():
        label = label_of(module)
        if label is not None:
            handles.append(module.register_forward_pre_hook(pre(label)))
            handles.append(module.register_forward_hook(post))
        # dense single blocks hold their FFN inline: proj_mlp, and the FFN columns of the fused proj_out
        if isinstance(module, FluxSingleTransformerBlock):
            for child in (module.proj_mlp, module.act_mlp):
                handles.append(child.register_forward_pre_hook(pre("dense FFN")))
                handles.append(child.register_forward_hook(post))

    originals = {
        "route": MoEFeedForward.route,
        "_shared": MoEFeedForward._shared,
        "_expert_matmul": MoEFeedForward._expert_matmul,
        "route_expert_choice": MoEFeedForward.route_expert_choice,
    }
    labels = {
        "route": "MoE routing",
        "route_expert_choice": "MoE routing",
        "_shared": "MoE shared expert",
        "_expert_matmul": "MoE routed expert GEMMs",
    }

    def wrap(name):
        fn = originals[name]

        def wrapped(*args, **kwargs):
            with torch.profiler.record_function(labels[name]):
                return fn(*args, **kwargs)

        return wrapped

    for name in originals:
        setattr(MoEFeedForward, name, wrap(name))
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(MoEFeedForward, name, fn)
        for handle in handles:
            handle.remove()


def profile_breakdown(fn, model: nn.Module) -> dict[str, float]:
    """Share of one call's wall time per component (exclusive of nested labelled ranges), plus the rest."""
    with labelled(model):
        fn()  # warm the hooks
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            fn()
            wall_us = (time.perf_counter() - start) * 1e6
    exclusive: dict[str, float] = defaultdict(float)
    op_self_us = 0.0
    for event in prof.events():
        if event.name in CATEGORIES:
            nested = sum(c.cpu_time_total for c in _labelled_descendants(event))
            exclusive[event.name] += event.cpu_time_total - nested
        elif not event.is_user_annotation:
            op_self_us += event.self_cpu_time_total
    shares = {name: exclusive[name] / wall_us for name in CATEGORIES}
    shares["unlabelled (embedders, sampler, Python between modules)"] = 1 - sum(shares.values())
    shares["Python and dispatcher, outside any op"] = max(0.0, 1 - op_self_us / wall_us)
    return shares


def _labelled_descendants(event) -> list:
    out = []
    for child in event.cpu_children:
        if child.name in CATEGORIES:
            out.append(child)
        else:
            out.extend(_labelled_descendants(child))
    return out


# --- main -----------------------------------------------------------------------------------------------------


def _hardware(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or "CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{cpu}, {torch.get_num_threads()} thread(s)"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["committed", "h512", "h1024"], choices=sorted(CONFIGS))
    parser.add_argument(
        "--student",
        action="append",
        default=[],
        metavar="DIR",
        help="an exported student folder to time beside the committed teacher (repeatable)",
    )
    parser.add_argument("--batch", type=int, default=None, help="images per sampling call (default: per config)")
    parser.add_argument("--steps", type=int, default=None, help="override the config's step count")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--profile", action="store_true", help="torch.profiler breakdown by component")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    args = parser.parse_args(argv)
    if (args.batch is not None and args.batch < 1) or args.repeats < 1:
        sys.exit("error: --batch and --repeats must be >= 1")

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    print(
        f"# {_hardware(device)}, torch {torch.__version__}, {args.dtype}, median of {args.repeats} interleaved repeats"
    )
    for key in args.configs:
        cfg = CONFIGS[key]
        steps, batch = args.steps or cfg.steps, args.batch or cfg.batch
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
        seeds = list(range(batch))
        teacher = _teacher(cfg, device, dtype)
        models = {"dense teacher": teacher} | students(teacher)
        if key == "committed":
            for folder in args.student:
                student = load_transformer(folder).to(device)
                models[f"student {folder}"] = (student if dtype == torch.float32 else student.to(dtype)).eval()
        samplers, flops = {}, {}
        for name, model in models.items():
            sampler, image_tokens, text_tokens = _pipeline(model, cfg, steps)
            samplers[name] = sampler
            flops[name] = flops_per_image(model, image_tokens=image_tokens, text_len=text_tokens)["total"]
        fns = {name: (lambda s=s, p=prompts, n=seeds: s(p, n)) for name, s in samplers.items()}
        seconds = time_interleaved(fns, args.repeats, args.warmup, device)
        print(
            f"\n## {cfg.name}: {image_tokens} image + {text_tokens} text tokens, {steps} steps, CFG "
            f"{cfg.cfg_scale:g}, batch {batch}\n"
        )
        print("| model | GFLOPs / image / step | FLOP ratio | s / image | time ratio | time / FLOP ratio |")
        print("|---|---:|---:|---:|---:|---:|")
        base_t, base_f = seconds["dense teacher"], flops["dense teacher"]
        for name in models:
            tr, fr = seconds[name] / base_t, flops[name] / base_f
            print(
                f"| {name} | {flops[name] / 1e9:.3f} | {fr:.3f} | {seconds[name] / batch:.4f} | {tr:.3f} | "
                f"{tr / fr:.2f} |"
            )
        if args.profile:
            print("\nShare of one sampling call's wall time (torch.profiler, exclusive of nested labels):\n")
            shares = {name: profile_breakdown(fns[name], models[name]) for name in models}
            print("| component | " + " | ".join(models) + " |")
            print("|---|" + "---:|" * len(models))
            for component in next(iter(shares.values())):
                print(f"| {component} | " + " | ".join(f"{shares[m][component]:.3f}" for m in models) + " |")
        del models, samplers, fns, teacher
        sys.stdout.flush()


if __name__ == "__main__":
    main()

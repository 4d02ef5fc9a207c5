"""Benchmark: sampling with a compute schedule (top-k by noise level) against the two constant top-k samplers.

A random MoE student (FLUX architecture, shapes-world pixel tokens) samples the same prompts and noise with top-k 2
at every step, with top-k 2 for σ > ``--switch`` and 1 below, and with top-k 1 at every step. Whole Euler loops
(classifier-free guidance: two forwards per step) run interleaved after a warm-up; medians are reported. Next to
each measured time ratio is the ratio of accounted FLOPs (``trajectory_cost``: the per-step FLOPs averaged over the
sampler's σ grid): the schedule should land between the constants in both, in proportion to the steps above and
below the switch. Time ratios differ from FLOP ratios by what the count leaves out (softmax, norms, routing
gathers and scatters; the last scale with top-k too).

    python -m benchmarks.sampling_schedule --dim 256 --image-size 64 --batch 4 --steps 8 --threads 1
"""

from __future__ import annotations

import argparse

import torch
from diffusers import FluxTransformer2DModel

from benchmarks.timing import time_interleaved
from src.models.accounting import trajectory_cost
from src.models.compute_schedule import check_schedule
from src.models.convert import ConversionConfig, convert_flux_to_moe
from src.models.pipeline import SamplingConfig, ShapesPipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--double", type=int, default=2, help="double-stream blocks")
    parser.add_argument("--single", type=int, default=4, help="single-stream blocks")
    parser.add_argument("--layout", default="1S4E2A", help="MoE layout; the constant schedules use its top-k and 1")
    parser.add_argument("--image-size", type=int, default=64, help="pixels; 4×4 patches")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--shift", type=float, default=1.0)
    parser.add_argument("--switch", type=float, default=0.5, help="σ below which the schedule drops to top-k 1")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dense = FluxTransformer2DModel(
        patch_size=1,
        in_channels=48,
        num_layers=args.double,
        num_single_layers=args.single,
        attention_head_dim=args.head_dim,
        num_attention_heads=args.dim // args.head_dim,
        joint_attention_dim=64,
        pooled_projection_dim=64,
        axes_dims_rope=(args.head_dim // 4, 3 * args.head_dim // 8, 3 * args.head_dim // 8),
    )
    conversion = ConversionConfig(layout=args.layout, split="random", assignment="random", router_init="normal")
    student = convert_flux_to_moe(dense, conversion).eval()
    top_k = int(args.layout.rsplit("E", 1)[1].removesuffix("A"))
    schedules = {
        f"constant k={top_k}": [[1.0, top_k]],
        f"k={top_k} for σ>{args.switch:g}, else 1": [[1.0, top_k], [args.switch, 1]],
        "constant k=1": [[1.0, 1]],
    }
    prompts = ["a photo of a red circle and a blue square"] * args.batch
    seeds = list(range(args.batch))
    pipelines, flops = {}, {}
    for name, schedule in schedules.items():
        sampling = SamplingConfig(steps=args.steps, cfg_scale=2.0, shift=args.shift, top_k_schedule=schedule)
        pipe = ShapesPipeline(student, image_size=args.image_size, sampling=sampling)
        pipelines[name] = pipe
        tokens = {"image_tokens": pipe.tokens_per_side**2, "text_len": pipe.text_encoder.cfg.max_tokens}
        cost = trajectory_cost(student, args.steps, args.shift, check_schedule(schedule, name), None, **tokens)
        flops[name] = cost["flops"]

    fns = {name: (lambda p=pipe: p(prompts, seeds)) for name, pipe in pipelines.items()}
    seconds = time_interleaved(fns, args.repeats, args.warmup)
    base = next(iter(schedules))
    print(
        f"dim {args.dim}, {args.double}+{args.single} blocks, {args.layout}, {pipe.tokens_per_side**2} image tokens, "
        f"batch {args.batch}, {args.steps} steps (shift {args.shift:g}, CFG), {args.threads} thread(s); "
        f"median of {args.repeats}"
    )
    print("| schedule | FLOPs / image / step | FLOP ratio | s / batch | time ratio |\n|---|---:|---:|---:|---:|")
    for name in schedules:
        print(
            f"| {name} | {flops[name] / 1e6:.1f} M | {flops[name] / flops[base]:.3f} | {seconds[name]:.3f} | "
            f"{seconds[name] / seconds[base]:.3f} |"
        )


if __name__ == "__main__":
    main()

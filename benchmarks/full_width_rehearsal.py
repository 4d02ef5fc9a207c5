"""Rehearsal of the FLUX.1-dev pipeline at its real block width: Taylor scores → stage 1 → stage 2 → stage 3.

FLUX.1-dev's blocks (hidden 3072 = 24 heads of 128, FFN 12288, T5 width 4096, pooled 768, guidance embeds, 64
latent channels) with few of them (default 1 double + 2 single), a random bf16 teacher, random latents and text
embeddings. Each stage is the project's ``DistillStage`` driven by a plain loop that does what Lightning's automatic
optimization does (autocast around the forward, backward, AdamW step, ``zero_grad(set_to_none=True)``; no
gradient clipping), so nothing but the stage modules and the student builder is exercised — no data pipeline,
no Trainer, no MLflow. Stage 3 groups the single blocks (MoB, m = 2, κ = 1).

Per stage it prints one table row: median step time, the allocation peak of the last step (CPU: torch.profiler
memory events plus the live parameters and optimizer state; CUDA: ``torch.cuda.max_memory_allocated``), the
process's peak RSS so far (CPU) and the memory plan of src/models/memory.py for the same stage (1 GPU, no FSDP).

    OMP_NUM_THREADS=1 python -m benchmarks.full_width_rehearsal --image-tokens 256 --text-tokens 64 --steps 2
    python -m benchmarks.full_width_rehearsal --device cuda --double 2 --single 2 --image-tokens 4096 \\
        --text-tokens 512 --stages moe_kd --steps 5 --out results/          # benchmarks/gpu_check.sh

Not part of the test suite: at full width a CPU step takes tens of seconds.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import resource
import statistics
import time
from pathlib import Path

import torch

FLUX_DEV_BLOCK = dict(
    patch_size=1,
    in_channels=64,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
"""FLUX.1-dev's config without its block counts (docs/design.md §4.3)."""

STAGES = ("taylor", "shared_kd", "moe_kd", "mob_kd")


def rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--double", type=int, default=1, help="double-stream blocks")
    parser.add_argument("--single", type=int, default=2, help="single-stream blocks")
    parser.add_argument("--image-tokens", type=int, default=256, help="image tokens (a square number; 4096 = 1024²)")
    parser.add_argument("--text-tokens", type=int, default=64, help="text tokens (FLUX.1-dev: 512)")
    parser.add_argument("--batch", type=int, default=1, help="samples per step")
    parser.add_argument(
        "--heads", type=int, default=24, help="attention heads of 128 (FLUX.1-dev: 24; fewer: a smoke test)"
    )
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps per stage (the first is warm-up)")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=None, help="folder for rehearsal.json")
    args = parser.parse_args()
    side = math.isqrt(args.image_tokens)
    if side * side != args.image_tokens:
        parser.error(f"--image-tokens={args.image_tokens}: must be a square number (latents are square here)")
    stages = args.stages.split(",")
    if unknown := [s for s in stages if s not in STAGES]:
        parser.error(f"--stages: unknown {unknown}; allowed {list(STAGES)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = run(args, stages, side)
    print(table(rows, args))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        info = {"args": {k: str(v) for k, v in vars(args).items()}, "torch": torch.__version__, "rows": rows}
        if args.device == "cuda":
            info["gpu"] = torch.cuda.get_device_name()
        (args.out / "rehearsal.json").write_text(json.dumps(info, indent=1) + "\n")


def run(args: argparse.Namespace, stages: list[str], side: int) -> list[dict]:
    from diffusers import FluxTransformer2DModel

    from src.models.convert import ConversionConfig
    from src.models.flux_moe import dense_ffns
    from src.models.memory import StageSetup, allocation_peak, plan_stage
    from src.models.mob import MoBConfig
    from src.models.moe import moe_layers
    from src.models.student import StudentRecipe, build_student, tensor_bytes, with_mob
    from src.models.taylor import taylor_scores
    from src.training.conditioning import LatentConditioning, velocity
    from src.training.distill import DistillStage, StageSpec

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    started = time.perf_counter()
    with torch.device("meta"):
        config = FLUX_DEV_BLOCK | {"num_attention_heads": args.heads}
        teacher = FluxTransformer2DModel(**config, num_layers=args.double, num_single_layers=args.single)
    teacher = teacher.to_empty(device=device).to(torch.bfloat16)
    with torch.no_grad():  # small random weights: FLUX-like scales keep bf16 activations finite
        for p in teacher.parameters():
            p.normal_(0, 0.02)
    teacher = teacher.eval().requires_grad_(False)
    rows: list[dict] = [{"stage": "build teacher", "seconds": time.perf_counter() - started, "rss_gib": rss_gib()}]
    conditioning = LatentConditioning(guidance=3.5)
    gen = torch.Generator().manual_seed(0)
    B, T = args.batch, args.text_tokens
    batch = {
        "latents": torch.randn(B, 16, 2 * side, 2 * side, generator=gen).to(device),
        "t5": torch.randn(B, T, 4096, generator=gen).to(device),
        "pooled": torch.randn(B, 768, generator=gen).to(device),
    }

    scores = None
    if "taylor" in stages:
        inputs = conditioning.inputs(batch)
        x0 = inputs.x0_BLD
        sigma = torch.rand(B, generator=gen).to(device)
        noise = torch.randn(x0.shape, generator=gen).to(device)
        x_t = (1 - sigma[:, None, None]) * x0 + sigma[:, None, None] * noise

        def loss_fn(model, b):
            return torch.nn.functional.mse_loss(velocity(model, x_t, sigma, inputs, 3.5).float(), noise - x0)

        t0 = time.perf_counter()
        scores = taylor_scores(teacher, [None] * args.steps, loss_fn)
        rows.append({"stage": "taylor", "step_s": (time.perf_counter() - t0) / args.steps, "rss_gib": rss_gib()})
    if scores is None:
        scores = {name: torch.rand(ffn.up.out_features, device=device) for name, ffn in dense_ffns(teacher).items()}
    student = build_student(teacher, StudentRecipe(ConversionConfig(layout="1S12E2A")), scores=scores)

    for kind in [s for s in stages if s != "taylor"]:
        for layer in moe_layers(student):  # the runner reloads the student between stages: stage 1's top-k 0 goes
            layer.top_k = layer.cfg.top_k
        if kind == "mob_kd":
            student = with_mob(student, MoBConfig(stream="single", group_size=min(2, args.single), active=1))
        spec = StageSpec(name=kind, kind=kind, batch_size=B, precision="bf16-mixed", warmup_steps=1, lr=1e-4)
        module = DistillStage(teacher, student, spec, conditioning).to(device)
        optimizer = module.configure_optimizers()["optimizer"]

        step = functools.partial(train_step, module, optimizer, batch, device.type)
        times = []
        for i in range(args.steps):
            last = i == args.steps - 1
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            if last and not cuda:
                above = allocation_peak(step)
            else:
                step()
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        state = sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values() if v.dim())
        if cuda:
            peak = torch.cuda.max_memory_allocated()
        else:
            peak = tensor_bytes(teacher) + tensor_bytes(student) + state + above
        setup = StageSetup(
            trained=frozenset(n for n, p in student.named_parameters() if p.requires_grad),
            compute_dtype=torch.bfloat16,
            teacher_dtype=torch.bfloat16,
            batch_size=B,
            image_tokens=args.image_tokens,
            text_tokens=T,
            top_k=0 if kind == "shared_kd" else None,
            kind=kind,
        )
        plan = plan_stage(teacher, student, setup)
        module.teardown("fit")
        rows.append(
            {
                "stage": kind,
                # the first step allocates the optimizer state (and warms caches): median of the rest
                "step_s": statistics.median(times[1:] or times),
                "first_step_s": times[0],
                "peak_gib": peak / 2**30,
                "plan_gib": plan["peak"] / 2**30,
                "plan_over_measured": plan["peak"] / peak,
                "rss_gib": None if cuda else rss_gib(),
                "trained_params": sum(p.numel() for p in student.parameters() if p.requires_grad),
            }
        )
    return rows


def train_step(module, optimizer, batch: dict, device_type: str) -> None:
    """What Lightning's automatic optimization does for one step (without gradient clipping)."""
    with torch.autocast(device_type, dtype=torch.bfloat16):
        loss = module.losses(batch)["loss"]
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def table(rows: list[dict], args: argparse.Namespace) -> str:
    def cell(row: dict, key: str, fmt: str) -> str:
        value = row.get(key)
        return "" if value is None else format(value, fmt)

    head = (
        f"FLUX.1-dev block width ({args.heads}×128 heads, FFN 4D, T5 4096, pooled 768, guidance), {args.double} double + "
        f"{args.single} single blocks, bf16 teacher, bf16-mixed stages, batch {args.batch}, {args.image_tokens} image + "
        f"{args.text_tokens} text tokens, {args.steps} steps per stage, {args.device}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    peak = "CUDA max allocated" if args.device == "cuda" else "allocated peak"
    lines = [
        head,
        "",
        f"| stage | trained params | s/step | first step s | {peak} GiB | plan GiB | plan / measured | peak RSS GiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        trained = f"{r['trained_params'] / 1e6:.1f} M" if "trained_params" in r else ""
        lines.append(
            f"| {r['stage']} | {trained} | {cell(r, 'step_s', '.2f') or cell(r, 'seconds', '.1f')} | "
            f"{cell(r, 'first_step_s', '.2f')} | {cell(r, 'peak_gib', '.2f')} | {cell(r, 'plan_gib', '.2f')} | "
            f"{cell(r, 'plan_over_measured', '.2f')} | {cell(r, 'rss_gib', '.2f')} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()

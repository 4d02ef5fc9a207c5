"""Does a LoRA trained on the dense teacher carry onto a trained MoE student? (issue 19's fidelity measurement)

The exactness of the mapping is a unit test (tests/test_lora.py: converting teacher + LoRA equals mapping the LoRA
onto the converted teacher). This measures what a user sees with a *trained* student, whose weights have moved away
from the teacher's during distillation:

1. Train a real LoRA on the dense GenEval-glyphs teacher with PEFT (rank 8 on attention and every FFN projection,
   as diffusers' FLUX LoRA scripts target), on a restyled world: the same prompts and glyphs on a cyan instead of a
   grey background. Save it with ``FluxPipeline.save_lora_weights`` (the file a FLUX user would hand us).
2. Read that file with ``src.models.lora`` and fuse it into the trained student (what ``python -m src.cli lora``
   does), and into a copy of the dense teacher (checked against the PEFT model's own, unfused output).
3. Sample GenEval's 553 prompts from the same noise with teacher, teacher + LoRA (fused, equal to PEFT's adapters
   to the printed tolerance), student, student + LoRA; ``grid.png`` shows the first prompts, one row per model.

Reported, each with a bootstrap 95% interval over prompts:
- fidelity: PSNR of the student to the teacher without the LoRA, and of student + LoRA to teacher + LoRA, and the
  paired difference (does the LoRA make the student drift further from its teacher?);
- the LoRA's effect: share of pixels painted in the LoRA's background colour by each model;
- content: GenEval-glyphs of each model (the LoRA's background mapped back to grey before detection).

    python -m benchmarks.lora_fidelity --student runs/sweeps/glyphs_claims/trial_0001/run/stage2_moe/student
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import FluxPipeline
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from PIL import Image
from torchvision.utils import make_grid

from evaluation.bootstrap import geneval_differences, mean_difference, mean_interval
from evaluation.fidelity import fidelity
from evaluation.geneval import summarize
from evaluation.glyph_detector import evaluate_glyph_image
from src.data.datamodule import images_to_tensor
from src.data.glyphs import GLYPH_BACKGROUND, GlyphWorld, prompt_of
from src.models.flow import interpolate, sample_sigmas
from src.models.flux_moe import set_top_k
from src.models.loading import load_transformer
from src.models.lora import fuse_lora, read_lora
from src.models.pipeline import SamplingConfig, ShapesPipeline
from src.progress import progress_bar

LORA_BACKGROUND = (0, 240, 240)
"""The LoRA's style: cyan, ≥ 175 RGB units from every GenEval colour of the palette and from the grey background."""
STYLE_RADIUS = 40.0
"""A pixel counts as LoRA background within this RGB distance of ``LORA_BACKGROUND``."""
TARGETS = [
    "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp", "proj_out",
]  # fmt: skip


def restyle(image_HW3: np.ndarray) -> np.ndarray:
    """The world's render with the grey background painted cyan (the glyphs untouched)."""
    out = image_HW3.copy()
    out[(image_HW3 == np.asarray(GLYPH_BACKGROUND, dtype=np.uint8)).all(-1)] = LORA_BACKGROUND
    return out


def unstyle(images_NHW3: np.ndarray) -> np.ndarray:
    """Pixels near the LoRA background back to grey, so the glyph detector (grey background) reads the content."""
    near_NHW = np.linalg.norm(images_NHW3.astype(np.float64) - LORA_BACKGROUND, axis=-1) < STYLE_RADIUS
    out = images_NHW3.copy()
    out[near_NHW] = GLYPH_BACKGROUND
    return out


def style_share(images_NHW3: np.ndarray) -> np.ndarray:
    """Per image: the share of pixels in the LoRA's background colour."""
    return (np.linalg.norm(images_NHW3.astype(np.float64) - LORA_BACKGROUND, axis=-1) < STYLE_RADIUS).mean((1, 2))


def train_lora(teacher: torch.nn.Module, args: argparse.Namespace) -> torch.nn.Module:
    """A PEFT LoRA on a copy of the teacher, trained with the teacher's own loss on the restyled world."""
    model = copy.deepcopy(teacher).requires_grad_(False)
    model.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=TARGETS))
    pipeline = ShapesPipeline(model)
    world = GlyphWorld(size=pipeline.image_size)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr)
    generator = torch.Generator().manual_seed(args.seed)
    model.train()
    losses: list[tuple[int, float]] = []
    with progress_bar("LoRA on the teacher", args.steps) as bar:
        task = bar.add_task("LoRA on the teacher", total=args.steps)
        for step in range(args.steps):
            pairs = [world.train_sample(10**6 * (args.seed + 1) + step * args.batch + i) for i in range(args.batch)]
            x0_BLD = pipeline.images_to_tokens(images_to_tensor([restyle(image) for image, _ in pairs]))
            keep_B = torch.rand(args.batch, generator=generator) >= 0.1  # the teacher's text dropout
            prompts = [prompt_of(md) if k else "" for (_, md), k in zip(pairs, keep_B.tolist())]
            tokens, pooled = pipeline.encode_prompts(prompts)
            sigma_B = sample_sigmas(args.batch, "logit_normal", 3.0, generator=generator)
            noise_BLD = torch.randn(x0_BLD.shape, generator=generator)
            v_BLD = pipeline.velocity(interpolate(x0_BLD, noise_BLD, sigma_B), sigma_B, tokens, pooled)
            loss = F.mse_loss(v_BLD, noise_BLD - x0_BLD)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            bar.advance(task)
            if step % 50 == 0 or step == args.steps - 1:
                losses.append((step, loss.item()))  # a host sync every 50 steps, not every step
    print("LoRA training loss: " + ", ".join(f"{loss:.4f} @ {step}" for step, loss in losses))
    return model.eval()


def sample_all(model: torch.nn.Module, metadata: list[dict], args: argparse.Namespace, label: str) -> np.ndarray:
    pipeline = ShapesPipeline(model, sampling=SamplingConfig(steps=args.steps_sampling, cfg_scale=args.cfg_scale))
    images = []
    with progress_bar(f"sampling {label}", len(metadata)) as bar:
        task = bar.add_task(f"sampling {label}", total=len(metadata))
        for start in range(0, len(metadata), args.sample_batch):
            chunk = metadata[start : start + args.sample_batch]
            images.append(pipeline([md["prompt"] for md in chunk], list(range(start, start + len(chunk)))))
            bar.update(task, advance=len(chunk))
    return np.concatenate(images)


def geneval_correct(images: np.ndarray, metadata: list[dict]) -> np.ndarray:
    return np.array([evaluate_glyph_image(image, md)[0] for image, md in zip(images, metadata)], dtype=np.float64)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--teacher", default="checkpoints/teacher_glyphs")
    parser.add_argument("--student", required=True, help="a trained student's diffusers folder (glyph world)")
    parser.add_argument("--steps", type=int, default=1200, help="LoRA training steps")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prompts", type=int, default=553, help="first N of GenEval's 553 prompts")
    parser.add_argument("--prompt_stride", type=int, default=1, help="every k-th of those prompts")
    parser.add_argument("--lora", default=None, help="an existing LoRA file instead of training one")
    parser.add_argument("--student_top_k", type=int, default=None, help="sample the student with this top-k")
    parser.add_argument("--steps_sampling", type=int, default=20)
    parser.add_argument("--cfg_scale", type=float, default=2.0)
    parser.add_argument("--sample_batch", type=int, default=64)
    parser.add_argument("--grid", type=int, default=12, help="prompts shown per row of grid.png")
    parser.add_argument("--out", default="runs/lora_fidelity", help="folder for the LoRA file and results.json")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    started = time.perf_counter()

    teacher = load_transformer(args.teacher).eval()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fused_vs_peft = None
    if args.lora is None:
        teacher_lora = train_lora(teacher, args)
        FluxPipeline.save_lora_weights(out, transformer_lora_layers=get_peft_model_state_dict(teacher_lora))
        lora = read_lora(out / "pytorch_lora_weights.safetensors")
    else:
        lora = read_lora(args.lora)

    fused_teacher = copy.deepcopy(teacher)
    fuse_lora(fused_teacher, lora)
    student = load_transformer(args.student).eval()
    if args.student_top_k is not None:
        set_top_k(student, args.student_top_k)
    student_lora = copy.deepcopy(student)
    mapped = fuse_lora(student_lora, lora)

    if args.lora is None:  # the fused dense teacher against PEFT's own adapters: the file and the fusing are exact
        probe = ShapesPipeline(teacher)
        x_BLD = torch.randn(
            4, probe.tokens_per_side**2, teacher.config.in_channels, generator=torch.Generator().manual_seed(1)
        )
        tokens, pooled = probe.encode_prompts(["a photo of a red bench"] * 4)
        sigma_B = torch.tensor([0.9, 0.6, 0.3, 0.1])
        with torch.no_grad():
            fused_vs_peft = float(
                (probe.velocity(x_BLD, sigma_B, tokens, pooled, fused_teacher)
                 - probe.velocity(x_BLD, sigma_B, tokens, pooled, teacher_lora)).abs().max()
            )  # fmt: skip

    metadata = GlyphWorld().heldout_metadata()[: args.prompts : args.prompt_stride]
    images = {
        "teacher": sample_all(teacher, metadata, args, "teacher"),
        "teacher + LoRA": sample_all(fused_teacher, metadata, args, "teacher + LoRA"),
        "student": sample_all(student, metadata, args, "student"),
        "student + LoRA": sample_all(student_lora, metadata, args, "student + LoRA"),
    }
    plain = fidelity(images["student"], images["teacher"], per_pair=True)["per_pair"]["psnr"]
    with_lora = fidelity(images["student + LoRA"], images["teacher + LoRA"], per_pair=True)["per_pair"]["psnr"]
    rows, correct = {}, {}
    for name, batch in images.items():
        correct[name] = geneval_correct(unstyle(batch) if "LoRA" in name else batch, metadata)
        records = [
            {"tag": md["tag"], "metadata": json.dumps(md), "correct": c} for md, c in zip(metadata, correct[name])
        ]
        rows[name] = {"style_share": mean_interval(style_share(batch)), "geneval": summarize(records)["overall"]}
    tags = [md["tag"] for md in metadata]
    lora_effect = {  # GenEval with the LoRA − without, paired over prompts (overall stratified by task)
        model: geneval_differences(tags, correct[model], correct[f"{model} + LoRA"], seed=1)["overall"]
        for model in ("teacher", "student")
    }
    result = {
        "lora_modules": len(lora),
        "student_modules_changed": mapped,
        "fused_teacher_vs_peft_max_abs": fused_vs_peft,
        "psnr_student_vs_teacher": mean_interval(plain, seed=1).as_dict(),
        "psnr_student_lora_vs_teacher_lora": mean_interval(with_lora, seed=1).as_dict(),
        "delta_psnr_with_lora": mean_difference(plain, with_lora, seed=1).as_dict(),
        "models": {
            k: {"style_share": v["style_share"].as_dict(), "geneval_glyphs": v["geneval"]} for k, v in rows.items()
        },
        "geneval_delta_with_lora": {k: v.as_dict() for k, v in lora_effect.items()},
        "prompts": len(metadata),
        "wall_s": time.perf_counter() - started,
        "args": vars(args),
    }
    grid = make_grid(
        torch.from_numpy(np.concatenate([batch[: args.grid] for batch in images.values()])).permute(0, 3, 1, 2),
        nrow=args.grid,
        padding=1,
    )
    Image.fromarray(grid.permute(1, 2, 0).numpy()).resize((grid.shape[2] * 4, grid.shape[1] * 4), Image.NEAREST).save(
        out / "grid.png"
    )
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")

    print(
        f"LoRA: {len(lora)} modules ({args.lora or f'rank {args.rank}, {args.steps} steps'}); into the student: {mapped}"
    )
    if fused_vs_peft is not None:
        print(f"fused dense teacher vs PEFT adapters: max |Δv| = {fused_vs_peft:.2e}")
    print(f"\n{len(metadata)} GenEval prompts × 1 image, same noise for all four models\n")
    print("| model | LoRA-background pixels [95% CI] | GenEval-glyphs |")
    print("|---|---:|---:|")
    for name, row in rows.items():
        share = row["style_share"]
        print(
            f"| {name} | {100 * share.estimate:.1f} % [{100 * share.low:.1f}, {100 * share.high:.1f}] | {100 * row['geneval']:.1f} |"
        )
    psnr = {k: result[k] for k in ("psnr_student_vs_teacher", "psnr_student_lora_vs_teacher_lora")}
    for key, value in psnr.items():
        print(f"{key}: {value['estimate']:.2f} dB [{value['low']:.2f}, {value['high']:.2f}]")
    for model, interval in lora_effect.items():
        print(f"GenEval-glyphs of the {model}, with the LoRA − without: {interval.format()} points")
    delta = mean_difference(plain, with_lora, seed=1)
    print(f"Δ PSNR (with LoRA − without): {delta.format(scale=1, digits=2)} dB")
    print(f"wall {result['wall_s']:.0f} s; results in {out / 'results.json'}")
    return result


if __name__ == "__main__":
    main()

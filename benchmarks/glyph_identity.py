"""Probe: does a glyph-world teacher know which glyph a word means, at which noise level?

Generation has to commit to an object's glyph while the image is still mostly noise, so a teacher whose GenEval is
~0 may still be learning. This probe renders ground-truth images of single-object colour prompts ("a photo of a red
bench"), noises them to σ, takes the model's clean-image estimate x̂₀ (from its velocity: x̂₀ = x_t − σ·v) and reads
the glyph box of the object: each pixel is lit when it is nearer the object's colour than the background. The true
glyph's rank among the 80 by Hamming distance (0 = nearest; chance ≈ 40) and the share of objects for which it is
the nearest (top-1) say how much of the identity the text has supplied at that σ.

    python -m benchmarks.glyph_identity runs/teacher_glyphs/checkpoints/last.ckpt --sigmas 0.6 0.4
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from src.data.glyphs import CLASSES, GLYPH_BACKGROUND, GLYPH_PALETTE, GlyphWorld
from src.models.flow import unpack
from src.training.teacher import TeacherModule


def identity_probe(module: TeacherModule, sigmas: list[float], objects: int = 48, seed: int = 1) -> list[dict]:
    """Per σ: mean Hamming distance of x̂₀'s glyph to the true one, mean rank of the true glyph, top-1 share."""
    pipeline, world = module.pipeline, GlyphWorld(size=module.pipeline.image_size)
    rng = np.random.Generator(np.random.PCG64(seed))
    metadata = []
    while len(metadata) < objects:
        md = world.sample_metadata(rng)
        if md["tag"] == "colors":
            metadata.append(md)
    rendered = [world.render(md, rng) for md in metadata]
    images_BHWC = torch.tensor(np.stack([image for image, _ in rendered])).float() / 127.5 - 1
    x0_BLD = pipeline.images_to_tokens(images_BHWC.permute(0, 3, 1, 2))
    tokens, pooled = pipeline.encode_prompts([md["prompt"] for md in metadata])
    codes_NP = world.glyphs.reshape(len(CLASSES), -1)
    background_3 = np.asarray(GLYPH_BACKGROUND, dtype=np.float64)
    rows = []
    for sigma in sigmas:
        noise_BLD = torch.randn(x0_BLD.shape, generator=torch.Generator().manual_seed(seed))
        x_t = (1 - sigma) * x0_BLD + sigma * noise_BLD
        with torch.no_grad():
            v = pipeline.velocity(x_t, torch.full((len(metadata),), sigma), tokens, pooled)
        size = pipeline.image_size
        x0_hat = unpack(x_t - sigma * v, pipeline.patch_size, size, size).clamp(-1, 1)
        images = ((x0_hat + 1) * 127.5).permute(0, 2, 3, 1).numpy()
        distances, ranks = [], []
        for image, (_, objs) in zip(images, rendered):
            obj = objs[0]
            x1, y1, x2, y2 = obj.box
            pixels_P3 = image[y1:y2, x1:x2].reshape(-1, 3)
            colour_3 = np.asarray(GLYPH_PALETTE[obj.color], dtype=np.float64)
            lit_P = np.linalg.norm(pixels_P3 - colour_3, axis=1) < np.linalg.norm(pixels_P3 - background_3, axis=1)
            hamming_N = (codes_NP != lit_P).sum(1)
            true = CLASSES.index(obj.name)
            distances.append(hamming_N[true])
            ranks.append(int((hamming_N < hamming_N[true]).sum()))
        rows.append(
            {
                "sigma": sigma,
                "hamming": float(np.mean(distances)),
                "rank": float(np.mean(ranks)),
                "top1": float(np.mean(np.asarray(ranks) == 0)),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a TeacherModule Lightning checkpoint of the glyph world")
    parser.add_argument("--sigmas", type=float, nargs="+", default=[0.8, 0.6, 0.4])
    parser.add_argument("--objects", type=int, default=48)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    module = TeacherModule.load_from_checkpoint(args.checkpoint, map_location="cpu").eval()
    print(f"{args.checkpoint}: {args.objects} single-object colour prompts")
    print("| σ | Hamming to the true glyph (of 36) | rank of the true glyph (chance ≈ 40) | top-1 |")
    print("|---:|---:|---:|---:|")
    for row in identity_probe(module, args.sigmas, args.objects):
        print(f"| {row['sigma']} | {row['hamming']:.1f} | {row['rank']:.1f} | {row['top1']:.2f} |")


if __name__ == "__main__":
    main()

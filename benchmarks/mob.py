"""Benchmark: a MoB group running κ of its m blocks per sample against the dense group (all m blocks).

Inference (no grad). Each sample picks its own window of κ adjacent blocks (random router, so sub-batches differ
per block), so the group's time should approach κ/m of the dense group's: the target is κ/m + 0.05 (gather,
write-back and router overhead). "ideal" runs κ blocks on the whole batch, i.e. the same block-sample work with
no routing; "overhead" is MoB's own work (router, gathers, write-backs) around blocks that do nothing, relative
to the dense group. Variants run interleaved (round robin) after a warm-up; medians are reported.

    python -m benchmarks.mob --dim 256 --image-tokens 256 --text-tokens 32 --batch 16 --threads 2
"""

from __future__ import annotations

import argparse

import torch
from diffusers.models.transformers.transformer_flux import (
    FluxPosEmbed,
    FluxSingleTransformerBlock,
    FluxTransformerBlock,
)
from torch import nn

from benchmarks.timing import time_interleaved
from src.models.mob import MoBConfig, MoBGroup

SETTINGS = ((2, 1), (4, 1), (4, 2), (4, 3), (8, 2))
"""(m, κ) pairs measured."""


class Passthrough(nn.Module):
    """A block that does nothing: a group of these times MoB's own work (router, gathers, write-backs)."""

    def forward(self, hidden_states, encoder_hidden_states, temb, image_rotary_emb=None, joint_attention_kwargs=None):
        return encoder_hidden_states, hidden_states


def make_blocks(stream: str, count: int, dim: int, head_dim: int) -> nn.ModuleList:
    cls = FluxTransformerBlock if stream == "double" else FluxSingleTransformerBlock
    return nn.ModuleList(cls(dim, dim // head_dim, head_dim) for _ in range(count)).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stream", choices=["single", "double"], default="single")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--image-tokens", type=int, default=256)
    parser.add_argument("--text-tokens", type=int, default=32)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dim, batch = args.dim, args.batch
    hidden = torch.randn(batch, args.image_tokens, dim)
    encoder = torch.randn(batch, args.text_tokens, dim)
    temb = torch.randn(batch, dim)
    axes = [args.head_dim // 4, 3 * args.head_dim // 8, 3 * args.head_dim // 8]
    rope = FluxPosEmbed(theta=10000, axes_dim=axes)(torch.randn(args.text_tokens + args.image_tokens, 3))

    print(
        f"MoB group vs dense group, inference, {args.stream} blocks, dim {dim}, {args.image_tokens} image + "
        f"{args.text_tokens} text tokens, batch {batch}, {args.threads} threads, median of {args.repeats}"
    )
    print(
        f"{'m':>3} {'κ':>3} {'dense ms':>9} {'mob ms':>8} {'ideal ms':>9} {'mob/dense':>10} {'ideal/dense':>12} "
        f"{'overhead':>9} {'target':>7}  verdict"
    )
    for m, k in SETTINGS:
        blocks = make_blocks(args.stream, m, dim, args.head_dim)
        cfg = MoBConfig(stream=args.stream, group_size=m, active=k, router_init="normal", router_init_std=1.0)
        group = MoBGroup(cfg, args.stream, 0, dim)

        def dense(blocks: nn.ModuleList = blocks, count: int = m) -> None:
            enc, hid = encoder, hidden
            for block in blocks[:count]:
                enc, hid = block(hid, enc, temb, rope)

        fns = {
            "dense": dense,
            "mob": lambda group=group, blocks=blocks: group(blocks, hidden, encoder, temb, rope),
            "ideal": lambda dense=dense, k=k: dense(count=k),
            "overhead": lambda group=group, m=m: group([Passthrough()] * m, hidden, encoder, temb, rope),
        }
        with torch.no_grad():
            times = time_interleaved(fns, args.repeats, args.warmup)
        spread = group.last_choice.float().mean(0)
        assert torch.allclose(spread.sum(), torch.tensor(float(k)))
        ratio, ideal, target = times["mob"] / times["dense"], times["ideal"] / times["dense"], k / m + 0.05
        verdict = "ok" if ratio <= target else f"over by {ratio - target:.3f}"
        print(
            f"{m:>3} {k:>3} {1e3 * times['dense']:>9.1f} {1e3 * times['mob']:>8.1f} {1e3 * times['ideal']:>9.1f} "
            f"{ratio:>10.3f} {ideal:>12.3f} {times['overhead'] / times['dense']:>9.4f} {target:>7.3f}  {verdict}"
        )


if __name__ == "__main__":
    main()

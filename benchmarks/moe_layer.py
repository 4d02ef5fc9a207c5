"""Benchmark: the MoE feed-forward layer against the dense FFN it replaces and the ideal dense FFN.

Prints forward (inference, no grad) and forward+backward times of ``MoEFeedForward`` relative to
(a) the dense FFN it was converted from (same total width F) and (b) a dense FFN of the activated width
S·F_s + K·F_e, "the ideal": the same GEMM FLOPs with no routing, gather or combine. Variants run interleaved
(round robin) after a warm-up; medians are reported. With --pieces it also times the MoE's parts (forward); with
--expert-choice also the same layer routing by expert choice (one pool of all T tokens, capacity factor 1 by default:
on average K experts per token, the same activated width).

    python -m benchmarks.moe_layer --dim 256 --tokens 4096 --layout 1S12E2A --dtype fp32 --threads 2
    python -m benchmarks.moe_layer --dim 256 --tokens 4096 --expert-choice --threads 1
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.timing import time_interleaved
from src.models.moe import MoEConfig, MoEFeedForward, layout_widths, parse_layout

EPILOG = """\
glibc malloc: temporaries >= 32 MiB (e.g. the gathered T*K x D rows at large T*K) are mmap'ed and
page-faulted afresh every call, which can cost several x on the gather. The allocator reads its settings at
process start, so they cannot be set from inside this script; set them in the shell instead:
    MALLOC_MMAP_THRESHOLD_=1000000000 MALLOC_TRIM_THRESHOLD_=1000000000 python -m benchmarks.moe_layer ...
(or LD_PRELOAD jemalloc/tcmalloc). See docs/design.md §7.1 and §7.2.
"""

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class DenseFFN(nn.Module):
    """Linear → tanh-GELU → Linear: the FLUX FeedForward."""

    def __init__(self, dim: int, width: int) -> None:
        super().__init__()
        self.up = nn.Linear(dim, width)
        self.down = nn.Linear(width, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x), approximate="tanh"))


def _forward_and_backward(module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        module.zero_grad(set_to_none=True)
        x.grad = None
        module(x).backward(grad)

    return step


def _forward(module: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        module.eval()  # inference: no balance loss
        with torch.no_grad():
            module(x)
        module.train()

    return step


def moe_pieces(layer: MoEFeedForward, x_TD: torch.Tensor) -> dict[str, Callable[[], object]]:
    """The MoE forward cut into its parts, each callable alone (inputs precomputed), for a profile."""
    K, E = layer.top_k, layer.num_experts
    with torch.no_grad():
        logits_ET, scores_ET, gates_TK, topk_idx_TK = layer.route(x_TD)
        expert_N = topk_idx_TK.reshape(-1)
        order_N = torch.argsort(expert_N, stable=True)
        token_N = order_N // K
        sorted_expert_N = expert_N.index_select(0, order_N)
        gate_N = gates_TK.reshape(-1).index_select(0, order_N).to(x_TD.dtype)
        counts_E = torch.zeros(E, dtype=torch.long).scatter_add_(0, expert_N, torch.ones_like(expert_N))
        offs_E = counts_E.cumsum(0, dtype=torch.int32)
        x_ND = x_TD.index_select(0, token_N)
        h_NH = layer._expert_matmul(x_ND, layer.w_up, counts_E, offs_E)
        h_NF = F.gelu(h_NH, approximate="tanh") * gate_N.unsqueeze(-1)
        y_ND = layer._expert_matmul(h_NF, layer.w_down, counts_E, offs_E)
        out_TD = layer._shared(x_TD, x_TD.dtype)

    def sort_and_count() -> None:
        order = torch.argsort(expert_N, stable=True)
        expert_N.index_select(0, order)
        torch.zeros(E, dtype=torch.long).scatter_add_(0, expert_N, torch.ones_like(expert_N)).cumsum(0)

    return {
        "route (GEMM, softmax, top-k)": lambda: layer.route(x_TD),
        "argsort + counts": sort_and_count,
        "gather x (index_select)": lambda: x_TD.index_select(0, token_N),
        "grouped up GEMM": lambda: layer._expert_matmul(x_ND, layer.w_up, counts_E, offs_E),
        "+ expert bias (gather)": lambda: h_NH.clone().add_(layer.b_up.index_select(0, sorted_expert_N)),
        "GELU x gate": lambda: F.gelu(h_NH, approximate="tanh") * gate_N.unsqueeze(-1),
        "grouped down GEMM": lambda: layer._expert_matmul(h_NF, layer.w_down, counts_E, offs_E),
        "combine (index_add_)": lambda: out_TD.clone().index_add_(0, token_N, y_ND),
        "shared MLP (+ out bias)": lambda: layer._shared(x_TD, x_TD.dtype),
        "load stats (+ aux in train)": lambda: layer._record(logits_ET, scores_ET, counts_E, expert_N.numel()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dim", type=int, default=256, help="model width D")
    parser.add_argument("--ffn-ratio", type=int, default=4, help="dense FFN width F = ratio x D (FLUX: 4)")
    parser.add_argument("--tokens", type=int, default=4096, help="tokens T per call")
    parser.add_argument("--layout", default="1S12E2A", help="MoE layout <S>S<E>E<K>A")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (CPU)")
    parser.add_argument("--repeats", type=int, default=15, help="timed rounds (median reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds first")
    parser.add_argument("--pieces", action="store_true", help="also time the MoE forward's parts")
    parser.add_argument("--expert-choice", action="store_true", help="also time the layer with expert-choice routing")
    parser.add_argument("--capacity-factor", type=float, default=1.0, help="expert choice: C = ceil(factor·T·K/E)")
    parser.add_argument(
        "--target", type=float, default=1.3, help="target MoE / ideal ratio (FLUX dims, bf16 GPU: 1.15)"
    )
    parser.add_argument("--out", default=None, help="also write the medians and ratios to this JSON file")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    num_shared, num_experts, top_k = parse_layout(args.layout)
    ffn_width = args.ffn_ratio * args.dim
    shared_width, expert_width = layout_widths(ffn_width, num_shared, num_experts)
    # A small random router routes near-uniformly, as a load-balanced trained router would.
    cfg = MoEConfig.from_layout(args.layout, router_init="normal")
    moe = MoEFeedForward(args.dim, cfg, ffn_width=ffn_width)
    activated = moe.activated_width
    modules = {
        "moe": moe,
        "dense, total width": DenseFFN(args.dim, ffn_width),
        "dense, activated width (ideal)": DenseFFN(args.dim, activated),
    }
    if args.expert_choice:
        ec_cfg = MoEConfig.from_layout(
            args.layout,
            router_init="normal",
            routing="expert_choice",
            balance="none",
            capacity_factor=args.capacity_factor,
        )
        modules["moe, expert choice"] = MoEFeedForward(args.dim, ec_cfg, ffn_width=ffn_width)
    for module in modules.values():
        module.to(device=device, dtype=dtype)
    # The layer keeps its router in the module dtype but always computes it in fp32.
    x = torch.randn(args.tokens, args.dim, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn_like(x)

    fns: dict[str, Callable[[], float]] = {}
    for name, module in modules.items():
        fns[f"{name}|fwd"] = _forward(module, x)
        fns[f"{name}|fwd+bwd"] = _forward_and_backward(module, x, grad)
    medians = time_interleaved(fns, args.repeats, args.warmup, device)

    print(
        f"MoE layer benchmark: D={args.dim}, T={args.tokens}, layout {args.layout} "
        f"(shared {num_shared}x{shared_width}, routed {num_experts}x{expert_width}, top-{top_k}), "
        f"F={ffn_width}, activated width {activated} ({activated / ffn_width:.1%}), "
        f"{args.dtype}, {args.device}, {args.threads} threads, median of {args.repeats}"
    )
    print(f"expert matmul path: {moe.expert_matmul_path(dtype)}; torch {torch.__version__}")
    ideal = "dense, activated width (ideal)"
    print(f"\n{'variant':32s} {'fwd ms':>9s} {'fwd+bwd ms':>11s} {'fwd/ideal':>10s} {'f+b/ideal':>10s}")
    for name in modules:
        fwd, both = medians[f"{name}|fwd"], medians[f"{name}|fwd+bwd"]
        ratio_fwd, ratio_both = fwd / medians[f"{ideal}|fwd"], both / medians[f"{ideal}|fwd+bwd"]
        print(f"{name:32s} {fwd * 1e3:9.2f} {both * 1e3:11.2f} {ratio_fwd:10.2f} {ratio_both:10.2f}")
    total = "dense, total width"
    vs_total = [medians[f"moe|{p}"] / medians[f"{total}|{p}"] for p in ("fwd", "fwd+bwd")]
    vs_ideal = [medians[f"moe|{p}"] / medians[f"{ideal}|{p}"] for p in ("fwd", "fwd+bwd")]
    print(f"\nMoE vs dense (same total width): fwd {vs_total[0]:.2f}x, fwd+bwd {vs_total[1]:.2f}x")
    target = args.target
    verdict = "meets" if max(vs_ideal) <= target else f"misses by {max(vs_ideal) / target - 1:.0%}"
    print(
        f"verdict: MoE costs {vs_ideal[0]:.2f}x (fwd) / {vs_ideal[1]:.2f}x (fwd+bwd) the ideal dense FFN; "
        f"{verdict} the <= {target}x target"
    )
    ec = "moe, expert choice"
    if args.expert_choice:
        ec_vs_ideal = [medians[f"{ec}|{p}"] / medians[f"{ideal}|{p}"] for p in ("fwd", "fwd+bwd")]
        ec_vs_tc = [medians[f"{ec}|{p}"] / medians[f"moe|{p}"] for p in ("fwd", "fwd+bwd")]
        print(
            f"expert choice (capacity factor {args.capacity_factor}): {ec_vs_ideal[0]:.2f}x (fwd) / "
            f"{ec_vs_ideal[1]:.2f}x (fwd+bwd) the ideal dense FFN, {ec_vs_tc[0]:.2f}x / {ec_vs_tc[1]:.2f}x token choice"
        )

    if args.out:
        import json

        result = {
            "args": vars(args),
            "torch": torch.__version__,
            "device_name": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "medians_s": medians,
            "moe_over_ideal": {"fwd": vs_ideal[0], "fwd+bwd": vs_ideal[1]},
            "moe_over_dense_total": {"fwd": vs_total[0], "fwd+bwd": vs_total[1]},
            "meets_target": max(vs_ideal) <= target,
        }
        if args.expert_choice:
            result["expert_choice_over_ideal"] = {"fwd": ec_vs_ideal[0], "fwd+bwd": ec_vs_ideal[1]}
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)

    if args.pieces and device.type == "cpu" and cfg.activation == "gelu_tanh":
        x_TD = x.detach()
        pieces = moe_pieces(moe, x_TD)
        piece_medians = time_interleaved(pieces, args.repeats, args.warmup, device)
        ideal_fwd = medians[f"{ideal}|fwd"]
        print(f"\nMoE forward pieces (ms; share of the ideal dense forward {ideal_fwd * 1e3:.2f} ms):")
        for name, seconds in piece_medians.items():
            print(f"  {name:28s} {seconds * 1e3:7.2f}  {seconds / ideal_fwd:5.2f}")


if __name__ == "__main__":
    main()

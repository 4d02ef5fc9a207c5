"""Taylor importance of FFN neurons and the policies that split a dense FFN's neurons into experts.

Paper (Dense2MoE §3.1, via notes): a weight's first-order Taylor importance is |w · ∂L/∂w|; a neuron's score sums
it over its up-projection row (+ bias) and its down-projection column; the most important neurons form the shared
expert, the rest are spread evenly over the routed experts (the spreading policy is not given, so it is selectable
here). Diff-Pruning accumulates the scores over timesteps; the caller spreads the calibration batches over them.

Legend: F dense FFN width (neurons), R routed neurons, D model width, E routed experts, F_e expert width,
S·F_s total shared width.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from src.models.flux_moe import dense_ffns

SPLITS = ("taylor", "random", "contiguous")
ASSIGNMENTS = ("random", "interleave", "contiguous", "kmeans")
KMEANS_ITERS = 15
"""Balanced k-means iterations on the routed neurons' up-projection rows."""


def taylor_scores(
    model: nn.Module,
    batches: Iterable[Any],
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Per-neuron Taylor importance Σ|w·∂L/∂w| of every dense FFN, summed over `batches` (fp32, (F,) each).

    Keys: "transformer_blocks.3.ff", "transformer_blocks.3.ff_context", "single_transformer_blocks.5.mlp" (the
    proj_mlp rows and proj_out's MLP columns). The down-projection bias is shared by all neurons and not scored.
    Gradients are taken with `torch.autograd.grad`, so `.grad` fields and the model's `requires_grad` flags are
    left as they were.
    """
    ffns = dense_ffns(model)
    if not ffns:
        raise ValueError("taylor_scores: the model has no dense FFNs to score")
    params = [t for ffn in ffns.values() for t in (ffn.up.weight, ffn.up.bias, ffn.down.weight)]
    flags = [p.requires_grad for p in params]
    scores = {name: torch.zeros(ffn.up.out_features, device=ffn.up.weight.device) for name, ffn in ffns.items()}
    num_batches = 0
    try:
        for p in params:
            p.requires_grad_(True)
        for batch in batches:
            loss = loss_fn(model, batch)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            for k, (name, ffn) in enumerate(ffns.items()):
                triple = zip(params[3 * k : 3 * k + 3], grads[3 * k : 3 * k + 3])
                g_up, g_bias, g_down = (torch.zeros_like(p) if g is None else g for p, g in triple)
                w_down_DF, g_down_DF = ffn.down_weight(), g_down[:, ffn.cols]
                scores[name] += (
                    (ffn.up.weight * g_up).float().abs().sum(dim=1)
                    + (ffn.up.bias * g_bias).float().abs()
                    + (w_down_DF * g_down_DF).float().abs().sum(dim=0)
                ).detach()
            num_batches += 1
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
    if num_batches == 0:
        raise ValueError("taylor_scores: `batches` was empty; give at least one calibration batch")
    return scores


def save_scores(path: str | Path, scores: dict[str, torch.Tensor]) -> None:
    """Write scores to a safetensors file."""
    save_file({k: v.detach().float().contiguous().cpu() for k, v in scores.items()}, str(path))


def load_scores(path: str | Path) -> dict[str, torch.Tensor]:
    """Read scores written by `save_scores`."""
    return load_file(str(path))


def split_neurons(
    ffn_width: int,
    shared_total: int,
    num_experts: int,
    expert_width: int,
    split: str,
    assignment: str,
    scores_F: torch.Tensor | None = None,
    up_weight_FD: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Partition neurons 0..F-1 into the shared experts (S·F_s,) and routed experts (E, F_e); indices are sorted.

    split picks the shared neurons: "taylor" the highest `scores_F`, "contiguous" the first S·F_s, "random" a
    random set. assignment spreads the rest over experts, taking them in rank order (descending score when
    `scores_F` is given, else index order): "contiguous" chunks the ranking (expert 0 gets the best), "interleave"
    deals it round-robin (every expert gets the same mix of importance), "random" shuffles, "kmeans" clusters the
    normalised up-projection rows into equal-size groups (neurons that fire together share an expert).
    """
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: allowed {list(SPLITS)}")
    if assignment not in ASSIGNMENTS:
        raise ValueError(f"assignment={assignment!r}: allowed {list(ASSIGNMENTS)}")
    if shared_total + num_experts * expert_width != ffn_width:
        raise ValueError(
            f"widths: shared {shared_total} + {num_experts} x {expert_width} routed != FFN width {ffn_width}"
        )
    if split == "taylor" and scores_F is None:
        raise ValueError("split='taylor': needs Taylor scores (taylor_scores); or use split='random'/'contiguous'")
    if assignment == "kmeans" and up_weight_FD is None:
        raise ValueError("assignment='kmeans': needs the up-projection weight")
    if scores_F is not None and scores_F.shape != (ffn_width,):
        raise ValueError(f"scores: shape {tuple(scores_F.shape)}, expected ({ffn_width},)")

    ranked_F = torch.arange(ffn_width) if scores_F is None else _rank(scores_F.cpu())
    if split == "taylor":
        shared_idx = ranked_F[:shared_total]
    elif split == "contiguous":
        shared_idx = torch.arange(shared_total)
    else:
        shared_idx = torch.randperm(ffn_width, generator=generator)[:shared_total]
    is_shared_F = torch.zeros(ffn_width, dtype=torch.bool)
    is_shared_F[shared_idx] = True
    routed_R = ranked_F[~is_shared_F[ranked_F]]

    if num_experts == 0:
        expert_idx_EF = torch.empty(0, 0, dtype=torch.long)
    elif assignment == "contiguous":
        expert_idx_EF = routed_R.view(num_experts, expert_width)
    elif assignment == "interleave":
        expert_idx_EF = routed_R.view(expert_width, num_experts).t()
    elif assignment == "random":
        expert_idx_EF = routed_R[torch.randperm(len(routed_R), generator=generator)].view(num_experts, expert_width)
    else:
        rows_RD = up_weight_FD.detach().float().cpu()[routed_R]
        cluster_R = balanced_kmeans(rows_RD, num_experts, generator)
        expert_idx_EF = torch.stack([routed_R[cluster_R == e] for e in range(num_experts)])
    return shared_idx.sort().values, expert_idx_EF.sort(dim=1).values


def _rank(scores_F: torch.Tensor) -> torch.Tensor:
    """Neuron indices by descending score, ties broken by index (deterministic)."""
    return torch.sort(scores_F.float(), descending=True, stable=True).indices


def balanced_kmeans(rows_RD: torch.Tensor, num_clusters: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Spherical k-means into `num_clusters` groups of exactly R / num_clusters rows; returns cluster ids (R,)."""
    num_rows = rows_RD.shape[0]
    assert num_rows % num_clusters == 0
    x_RD = F.normalize(rows_RD, dim=1)
    centroids_ED = x_RD[torch.randperm(num_rows, generator=generator)[:num_clusters]]
    cluster_R = torch.zeros(num_rows, dtype=torch.long)
    for _ in range(KMEANS_ITERS):
        cluster_R = _balanced_assign(x_RD @ centroids_ED.t(), num_rows // num_clusters)
        sums_ED = torch.zeros_like(centroids_ED).index_add_(0, cluster_R, x_RD)
        centroids_ED = F.normalize(sums_ED, dim=1)
    return cluster_R


def _balanced_assign(sim_RE: torch.Tensor, capacity: int) -> torch.Tensor:
    """Each row to its most similar cluster that still has room; full clusters keep their most similar rows.

    Rounds of proposals: every unassigned row proposes to its best open cluster, each cluster accepts its
    best proposers up to its remaining capacity; a cluster fills or all rows land each round, so ≤ E rounds.
    """
    num_rows, num_clusters = sim_RE.shape
    cluster_R = torch.full((num_rows,), -1, dtype=torch.long)
    room_E = torch.full((num_clusters,), capacity, dtype=torch.long)
    while (cluster_R < 0).any():
        free_idx = torch.nonzero(cluster_R < 0).squeeze(1)
        sim = sim_RE[free_idx].masked_fill(room_E == 0, float("-inf"))
        choice = sim.argmax(dim=1)
        for e in range(num_clusters):
            proposers = free_idx[choice == e]
            if len(proposers) == 0:
                continue
            best = proposers[torch.argsort(sim_RE[proposers, e], descending=True, stable=True)[: int(room_E[e])]]
            cluster_R[best] = e
            room_E[e] -= len(best)
    return cluster_R


def router_centroids(up_weight_FD: torch.Tensor, expert_idx_EF: torch.Tensor) -> torch.Tensor:
    """Router weights (E, D): row e is the mean up-projection row of expert e's neurons.

    The logit x·mean_i(w_i) is then expert e's mean pre-activation (bias aside), i.e. the "mean fc1 activation"
    router init suggested in the paper notes (§2.3): tokens start routed to experts whose neurons they excite.
    """
    return up_weight_FD[expert_idx_EF].mean(dim=1)


__all__ = [
    "SPLITS",
    "ASSIGNMENTS",
    "taylor_scores",
    "save_scores",
    "load_scores",
    "split_neurons",
    "balanced_kmeans",
    "router_centroids",
]

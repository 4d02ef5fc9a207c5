"""Dense FLUX → MoE: split each FFN's neurons into a shared expert and routed experts (Dense2MoE stage 0).

Every non-FFN weight is copied exactly. An FFN y = W2·gelu_tanh(W1·x + b1) + b2 becomes shared experts (rows of
W1/b1 and the matching columns of W2) plus routed experts (w_up[e] = W1[rows_e]ᵀ, b_up[e] = b1[rows_e],
w_down[e] = W2[:, rows_e]ᵀ); b2 becomes the layer's output bias. With all experts active and every gate 1 the
converted model computes the dense function (tests/test_convert.py). A single-stream block's fused proj_out is split
into the attention output projection (keeping the bias) and the MoE down-projection. Each MoE layer keeps the split in
its `dense_neurons` buffer (which dense neuron each hidden unit is), so dense LoRAs can be mapped later.

Legend: D model width, F dense FFN width, E routed experts, F_e expert width, S·F_s total shared width.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from diffusers import FluxTransformer2DModel

from src.models.flux_moe import (
    DenseFFN,
    FluxMoETransformer2DModel,
    build_from_state,
    check_locations,
    dense_ffns,
    init_config,
)
from src.models.moe import BALANCES, GATES, MoEConfig, check_routing, layout_widths, parse_layout
from src.models.student_structure import LOCATIONS
from src.models.taylor import ASSIGNMENTS, SPLITS, router_centroids, split_neurons

ROUTER_INITS = ("zeros", "normal", "centroids")
ROUTER_NORMAL_STD = 0.02


@dataclass
class ConversionConfig:
    """How a dense FLUX transformer's FFNs become MoE layers."""

    layout: str = "1S12E2A"
    """Expert layout "<S>S<E>E<K>A": S shared experts, E routed experts, top-K (paper default 1S12E2A)."""
    locations: list[str] = field(default_factory=lambda: list(LOCATIONS))
    """FFNs to convert: "ff" (double-block image stream), "ff_context" (text stream), "single" (single blocks)."""
    shared_fraction: float = 0.25
    """Share of the dense FFN width each shared expert gets (paper: ratio 1 of 4); routed experts split the rest."""
    split: str = "taylor"
    """Which neurons form the shared expert: "taylor" (top Taylor scores; needs scores), "random", "contiguous"."""
    assignment: str = "interleave"
    """Routed neurons → experts in rank order: "interleave" (round-robin), "contiguous", "random", "kmeans"."""
    router_init: str = "centroids"
    """Router weights: "centroids" (each expert's mean up-projection row; the default), "normal" (std 0.02) or
    "zeros" (every logit tied: top-K sends all tokens of a layer to the same K experts, so stage 2 starts with the
    rest unused — measured in ``benchmarks/router_init.py``). Ignored by a layout without routed experts."""
    gate: str = "softmax"
    """Router score function: "softmax" or "sigmoid" (passed to MoEConfig)."""
    renormalize: bool = False
    """Renormalise the top-K gates to sum 1 (passed to MoEConfig)."""
    route_scale: float = 1.0
    """Scale on the routed gates (passed to MoEConfig)."""
    balance: str = "aux"
    """Load balancing: "aux", "aux_free" or "none" (passed to MoEConfig)."""
    aux_loss_weight: float = 1e-2
    """Balance loss weight λ (paper: 0.01; passed to MoEConfig); used when balance == "aux"."""
    z_loss_weight: float = 0.0
    """Weight of the router z-loss mean(logsumexp(logits)²) (ST-MoE); 0 = off (passed to MoEConfig)."""
    bias_update_rate: float = 1e-3
    """Step size γ of the aux-loss-free bias update (balance == "aux_free"; passed to MoEConfig)."""
    up_bias: bool = True
    """Biases on the shared and routed up-projections, holding the dense FFN's up-projection bias (passed to
    MoEConfig). False leaves them out: the student then no longer computes the dense function at conversion."""
    routing: str = "token_choice"
    """"token_choice" (the paper) or "expert_choice" (each expert takes its top tokens; needs balance="none")."""
    capacity_factor: float = 1.0
    """Expert choice: each expert takes ceil(capacity_factor·L·K/E) of a pool's L tokens (passed to MoEConfig)."""
    pool: str = "batch"
    """Expert-choice token pool: "batch" (all tokens of a layer call) or "sample" (each sample's tokens)."""
    seed: int = 0
    """Seed of the random split/assignment, k-means init and normal router init."""

    def __post_init__(self) -> None:
        try:
            num_shared, num_experts, _ = parse_layout(self.layout)
        except ValueError as err:
            raise ValueError(f"layout: {err}") from None
        if num_shared == 0 and self.split == "taylor":
            raise ValueError(f"split='taylor' with layout={self.layout!r}: no shared expert; use split='random'")
        if isinstance(self.locations, str) or not self.locations:
            raise ValueError(f"locations={self.locations!r}: a non-empty list out of {list(LOCATIONS)}")
        self.locations = list(self.locations)
        for loc in self.locations:
            if loc not in LOCATIONS:
                raise ValueError(f"locations: unknown location {loc!r}; allowed {list(LOCATIONS)}")
        if len(set(self.locations)) != len(self.locations):
            raise ValueError(f"locations={self.locations!r}: duplicates; each location at most once")
        if not 0 < self.shared_fraction <= 1 or num_shared * self.shared_fraction > 1:
            raise ValueError(f"shared_fraction={self.shared_fraction}: allowed (0, 1/num_shared]")
        for name, allowed in (
            ("split", SPLITS),
            ("assignment", ASSIGNMENTS),
            ("router_init", ROUTER_INITS),
            ("gate", GATES),
            ("balance", BALANCES),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r}: allowed {list(allowed)}")
        check_routing(self.routing, self.capacity_factor, self.pool, self.balance)
        # MoEConfig's own checks of the fields passed to it, before any FFN width is known
        MoEConfig(**{name: getattr(self, name) for name in ("aux_loss_weight", "z_loss_weight", "bias_update_rate")})

    def moe_config(self, ffn_width: int) -> MoEConfig:
        """The MoE layer config for a dense FFN of width F, widths resolved (ValueError if they don't divide F)."""
        num_shared, num_experts, top_k = parse_layout(self.layout)
        try:
            shared_width, expert_width = layout_widths(ffn_width, num_shared, num_experts, self.shared_fraction)
        except ValueError as err:
            raise ValueError(
                f"layout={self.layout!r}, shared_fraction={self.shared_fraction}: cannot split FFN width "
                f"{ffn_width} ({err})"
            ) from None
        return MoEConfig(
            num_experts=num_experts,
            top_k=top_k,
            num_shared=num_shared,
            expert_width=expert_width or None,
            shared_width=shared_width or None,
            activation="gelu_tanh",
            gate=self.gate,
            renormalize=self.renormalize,
            route_scale=self.route_scale,
            balance=self.balance,
            aux_loss_weight=self.aux_loss_weight,
            z_loss_weight=self.z_loss_weight,
            bias_update_rate=self.bias_update_rate,
            router_init=self.router_init,
            up_bias=self.up_bias,
            routing=self.routing,
            capacity_factor=self.capacity_factor,
            pool=self.pool,
            record_neurons=True,
        )


def convert_flux_to_moe(
    dense: FluxTransformer2DModel,
    cfg: ConversionConfig,
    scores: dict[str, torch.Tensor] | None = None,
) -> FluxMoETransformer2DModel:
    """A `FluxMoETransformer2DModel` computing `dense`'s function with the FFNs at `cfg.locations` as MoE layers.

    `scores` (from `taylor_scores`, keyed by FFN name) rank the neurons: the top ones form the shared expert when
    `cfg.split == "taylor"`, and they order the routed neurons for the interleave/contiguous assignments. `dense`
    may be width- or depth-pruned (a `FluxMoETransformer2DModel` without MoE); it is left unchanged.
    """
    if isinstance(dense, FluxMoETransformer2DModel) and dense.config.moe is not None:
        raise ValueError("dense: already has MoE layers (config `moe`); convert a dense model")
    check_locations(dense, cfg.locations)
    ffns = dense_ffns(dense, cfg.locations)
    widths = {ffn.up.out_features for ffn in ffns.values()}
    if len(widths) != 1:
        raise ValueError(f"locations={cfg.locations}: FFN widths differ ({sorted(widths)}); convert them separately")
    ffn_width = widths.pop()
    moe_cfg = cfg.moe_config(ffn_width)
    if cfg.split == "taylor" and scores is None:
        raise ValueError("split='taylor': pass Taylor scores (src.models.taylor.taylor_scores) or choose 'random'")
    if scores is not None:
        missing = sorted(set(ffns) - set(scores))
        if missing:
            raise ValueError(f"scores: no entry for {missing[:3]}{'...' if len(missing) > 3 else ''}")

    generator = torch.Generator().manual_seed(cfg.seed)
    converted_prefixes = tuple(p for name, ffn in ffns.items() for p in _dense_prefixes(name, ffn))
    state = {k: v.detach().clone() for k, v in dense.state_dict().items() if not k.startswith(converted_prefixes)}
    for name, ffn in ffns.items():
        shared_idx, expert_idx_EF = split_neurons(
            ffn_width,
            moe_cfg.num_shared * (moe_cfg.shared_width or 0),
            moe_cfg.num_experts,
            moe_cfg.expert_width or 0,
            split=cfg.split,
            assignment=cfg.assignment,
            scores_F=None if scores is None else scores[name],
            up_weight_FD=ffn.up.weight,
            generator=generator,
        )
        state |= _moe_state(name + ".", ffn, shared_idx, expert_idx_EF, cfg.router_init, cfg.up_bias, generator)
        if ffn.fused:
            block = name.rsplit(".", 1)[0]
            dim = ffn.down.out_features
            state[f"{block}.attn_out.weight"] = ffn.down.weight.detach()[:, :dim].clone()
            state[f"{block}.attn_out.bias"] = ffn.down.bias.detach().clone()

    config = init_config(dense)
    ffn_widths = {k: v for k, v in (config.get("ffn_widths") or {}).items() if k not in cfg.locations}
    config |= {
        "moe": dataclasses.asdict(moe_cfg),
        "moe_locations": list(cfg.locations),
        "ffn_widths": ffn_widths or None,
    }
    student = build_from_state(config, state, dense.device)
    return student.train(dense.training)


def _dense_prefixes(name: str, ffn: DenseFFN) -> tuple[str, ...]:
    """State-dict prefixes of a dense FFN's tensors (a single block's proj_mlp and its fused proj_out)."""
    if ffn.fused:
        block = name.rsplit(".", 1)[0]
        return f"{block}.proj_mlp.", f"{block}.proj_out."
    return (name + ".",)


def _moe_state(
    prefix: str,
    ffn: DenseFFN,
    shared_idx: torch.Tensor,
    expert_idx_EF: torch.Tensor,
    router_init: str,
    up_bias: bool,
    generator: torch.Generator,
) -> dict[str, torch.Tensor]:
    """MoEFeedForward tensors holding the dense FFN's neurons (shared rows/columns, per-expert slices)."""
    w_up_FD = ffn.up.weight.detach()
    b_up_F = ffn.up.bias.detach()
    w_down_DF = ffn.down_weight().detach()
    device = w_up_FD.device
    shared_idx, expert_idx_EF = shared_idx.to(device), expert_idx_EF.to(device)
    state: dict[str, torch.Tensor] = {}
    if len(shared_idx):
        state[prefix + "shared_up.weight"] = w_up_FD[shared_idx].contiguous()
        if up_bias:
            state[prefix + "shared_up.bias"] = b_up_F[shared_idx].contiguous()
        state[prefix + "shared_down.weight"] = w_down_DF[:, shared_idx].contiguous()
    if expert_idx_EF.numel():
        num_experts, dim = expert_idx_EF.shape[0], w_up_FD.shape[1]
        state[prefix + "w_up"] = w_up_FD[expert_idx_EF].transpose(1, 2).contiguous()  # (E, F_e, D) → (E, D, F_e)
        if up_bias:
            state[prefix + "b_up"] = b_up_F[expert_idx_EF].contiguous()
        state[prefix + "w_down"] = (
            w_down_DF[:, expert_idx_EF].permute(1, 2, 0).contiguous()
        )  # (D, E, F_e) → (E, F_e, D)
        if router_init == "centroids":
            router_ED = router_centroids(w_up_FD, expert_idx_EF)
        elif router_init == "normal":
            router_ED = ROUTER_NORMAL_STD * torch.randn(num_experts, dim, generator=generator)
        else:
            router_ED = torch.zeros(num_experts, dim)
        state[prefix + "router.weight"] = router_ED.to(device=device, dtype=w_up_FD.dtype).contiguous()
    if not ffn.fused:
        state[prefix + "out_bias"] = ffn.down.bias.detach().clone()
    # The split itself, kept with the student: a dense LoRA maps onto the experts' slices even after training.
    state[prefix + "dense_neurons"] = torch.cat([shared_idx, expert_idx_EF.reshape(-1)]).long()
    return state


__all__ = ["ConversionConfig", "ROUTER_INITS", "convert_flux_to_moe"]

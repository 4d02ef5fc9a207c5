"""Class-conditional diffusion transformer (DiT, adaLN-Zero) with dense or Mixture-of-Experts FFNs.

One model file for the DSMoE / JiTMoE recipe (arXiv 2512.01252) and its dense baselines: patchify → blocks of
adaLN-Zero attention + FFN → final adaLN layer → unpatchify. The FFN of a block is dense or the project's MoE
layer (``src.models.moe.MoEFeedForward``: shared experts, sigmoid/softmax routing, renormalisation, route scale,
aux loss or aux-loss-free bias); with ``interleave`` only the odd blocks (1, 3, 5, …) are MoE, as in every
released DSMoE/JiTMoE config. Positions are absolute 2D sin-cos, 2D axial RoPE (the recipe removes the absolute
embedding entirely) or both (JiT). The JiT options (pixel space, large patches, x-prediction) add a bottleneck
patch embedding, RMSNorm with q/k-norm and in-context class tokens.

The network only maps (z_t, t, y) to its output; whether that output is a velocity or a clean image is
``prediction``. Noise levels, velocities and samplers are src/models/flow.py's (σ = 1 pure noise, v = ε − x); the
network keeps the recipe's parameterization, reading the clean-time t = 1 − σ and predicting x − ε ("v") or x
("x"), and ``network_velocity`` turns that into flow.py's velocity. ``sample`` generates class-conditional images
with flow.py's Euler/Heun sampler under a ``SamplerConfig``.

Legend: B batch, C image channels, H/W height/width, L tokens, P = C·p² values per patch, D width, Hd heads,
Dh head width, F FFN width, N classes (+1 null class for classifier-free guidance).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from src.models.flow import (
    SAMPLE_PREDICTION_MIN_SIGMA,
    SAMPLERS,
    VelocityFn,
    ode_sample,
    pack,
    to_velocity,
    unpack,
)
from src.models.moe import MoEConfig, MoEFeedForward

POSITIONS = ("absolute", "rope2d", "absolute+rope2d")
NORMS = ("layernorm", "rmsnorm")
DENSE_ACTIVATIONS = ("gelu_tanh", "silu", "swiglu")
PREDICTIONS = ("v", "x")


@dataclass
class DiTConfig:
    """Architecture of a class-conditional DiT; ``moe`` None gives a dense DiT."""

    image_size: int = 32
    """Input side in pixels (pixel space) or latent cells (latent space); square inputs."""
    in_channels: int = 3
    """Input channels C (3 for RGB pixels, 4 for SD-VAE latents)."""
    patch_size: int = 4
    """Patch side p: L = (image_size / p)² tokens of C·p² values."""
    hidden: int = 96
    """Model width D."""
    depth: int = 6
    """Number of transformer blocks."""
    heads: int = 4
    """Attention heads (D must divide evenly)."""
    mlp_ratio: float = 4.0
    """Dense FFN width = int(D · mlp_ratio) (SwiGLU then takes 2/3 of it, as JiT does)."""
    dense_activation: str = "silu"
    """Dense FFN activation: "silu" (DSMoE's dense layers), "gelu_tanh" (DiT) or "swiglu" (JiT)."""
    moe: MoEConfig | None = None
    """Routed FFN layout (shared and routed experts, widths, gate, balancing); None = every FFN dense."""
    interleave: bool = True
    """With ``moe``: MoE in blocks 1, 3, 5, … and dense FFNs in between (the recipe); False = MoE everywhere."""
    num_classes: int = 24
    """Number of classes N; the label embedding has N + 1 rows, the last being the null class for CFG."""
    positions: str = "rope2d"
    """"absolute" (fixed 2D sin-cos added to the tokens), "rope2d" (2D axial RoPE) or "absolute+rope2d" (JiT)."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    norm: str = "layernorm"
    """Pre-modulation norm: "layernorm" without affine (DiT) or "rmsnorm" with weight (JiT)."""
    qk_norm: bool = False
    """RMSNorm on each head's queries and keys (JiT)."""
    patch_bottleneck: int | None = None
    """JiT's bottleneck patch embedding width (P → bottleneck → D); None = one linear P → D."""
    in_context_tokens: int = 0
    """JiT: copies of the class embedding (plus a learned position each) prepended to the sequence."""
    in_context_start: int = 0
    """JiT: index of the first block that sees the in-context tokens."""
    learn_sigma: bool = False
    """DiT's variance head: 2C output channels, the second half unused by flow objectives (kept so the
    recipe's latent presets count parameters as published)."""
    prediction: str = "v"
    """What the network outputs: "v" the recipe's velocity dz/dt = x − ε, minus flow.py's ε − x (DSMoE), or "x"
    the clean image (JiT); ``network_velocity`` converts either."""
    timestep_scale: float = 1000.0
    """t ∈ [0, 1] is multiplied by this before the sinusoidal embedding (the recipe's DSMoE code uses 1)."""

    def __post_init__(self) -> None:
        for name in ("image_size", "in_channels", "patch_size", "hidden", "depth", "heads", "num_classes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r}: must be a positive integer")
        if self.image_size % self.patch_size:
            raise ValueError(f"patch_size={self.patch_size}: must divide image_size={self.image_size}")
        if self.hidden % self.heads:
            raise ValueError(f"heads={self.heads}: must divide hidden={self.hidden}")
        for name, allowed in (
            ("positions", POSITIONS),
            ("norm", NORMS),
            ("dense_activation", DENSE_ACTIVATIONS),
            ("prediction", PREDICTIONS),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r}: allowed values are {', '.join(allowed)}")
        if "rope2d" in self.positions and (self.hidden // self.heads) % 4:
            raise ValueError(
                f"positions={self.positions!r}: 2D RoPE needs the head width hidden/heads = "
                f"{self.hidden // self.heads} to be a multiple of 4"
            )
        if "absolute" in self.positions and self.hidden % 4:
            raise ValueError(f"hidden={self.hidden}: the 2D sin-cos position embedding needs a multiple of 4")
        if not self.mlp_ratio > 0:
            raise ValueError(f"mlp_ratio={self.mlp_ratio!r}: must be > 0")
        if self.moe is not None and not isinstance(self.moe, MoEConfig):
            raise ValueError(f"moe={self.moe!r}: must be a MoEConfig or None (dense)")
        if self.patch_bottleneck is not None and self.patch_bottleneck < 1:
            raise ValueError(f"patch_bottleneck={self.patch_bottleneck!r}: must be a positive integer or None")
        if self.in_context_tokens < 0 or not 0 <= self.in_context_start < self.depth:
            raise ValueError(
                f"in_context_tokens={self.in_context_tokens}, in_context_start={self.in_context_start}: need "
                f"tokens >= 0 and 0 <= start < depth={self.depth}"
            )
        if not self.timestep_scale > 0:
            raise ValueError(f"timestep_scale={self.timestep_scale!r}: must be > 0")

    @property
    def grid(self) -> int:
        """Tokens per side."""
        return self.image_size // self.patch_size

    @property
    def dense_width(self) -> int:
        """Hidden width of the dense FFN (after SwiGLU's 2/3)."""
        width = int(self.hidden * self.mlp_ratio)
        return int(width * 2 / 3) if self.dense_activation == "swiglu" else width

    def is_moe_block(self, index: int) -> bool:
        """Whether block ``index`` has the MoE FFN (interleave: the recipe's ``i % 2 == 1``)."""
        return self.moe is not None and (not self.interleave or index % 2 == 1)


def modulate(x_BLD: Tensor, shift_BD: Tensor, scale_BD: Tensor) -> Tensor:
    return x_BLD * (1 + scale_BD.unsqueeze(1)) + shift_BD.unsqueeze(1)


def sincos_2d(dim: int, grid: int) -> Tensor:
    """(grid², dim) fixed embedding: first half encodes the row, second half the column (sin | cos each)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    pos = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(pos, pos, indexing="ij")
    parts = []
    for coord in (rows.reshape(-1), cols.reshape(-1)):
        angle = coord[:, None] * omega[None]
        parts += [angle.sin(), angle.cos()]
    return torch.cat(parts, dim=1).float()


def rope_2d_tables(head_dim: int, grid: int, theta: float, prefix: int = 0) -> tuple[Tensor, Tensor]:
    """cos, sin tables (prefix + grid², Dh) of 2D axial RoPE; the first ``prefix`` rows are the identity.

    The head is split into [row half | column half]; within a half, dimension i pairs with i + Dh/4 (the
    rotate-half convention) and both axes share the frequencies θ^(−j/(Dh/4)).
    """
    quarter = head_dim // 4
    inv_freq = 1.0 / theta ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    pos = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(pos, pos, indexing="ij")
    angles = [coord.reshape(-1, 1) * inv_freq[None] for coord in (rows, cols)]
    angle_LDh = torch.cat([angles[0], angles[0], angles[1], angles[1]], dim=1)
    angle_LDh = torch.cat([torch.zeros(prefix, head_dim, dtype=torch.float64), angle_LDh])
    return angle_LDh.cos().float(), angle_LDh.sin().float()


def apply_rope_2d(x_BHLDh: Tensor, cos_LDh: Tensor, sin_LDh: Tensor) -> Tensor:
    row, col = x_BHLDh.chunk(2, dim=-1)
    rotated = torch.cat([_rotate_half(row), _rotate_half(col)], dim=-1)
    return x_BHLDh * cos_LDh + rotated * sin_LDh


def _rotate_half(x: Tensor) -> Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def _norm(kind: str, dim: int) -> nn.Module:
    if kind == "rmsnorm":
        return nn.RMSNorm(dim, eps=1e-6)
    return nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, qk_norm: bool) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        head_dim = dim // heads
        self.q_norm = nn.RMSNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()

    def forward(self, x_BLD: Tensor, rope: tuple[Tensor, Tensor] | None) -> Tensor:
        b, length, d = x_BLD.shape
        qkv = self.qkv(x_BLD).view(b, length, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q_BHLDh, k_BHLDh, v_BHLDh = qkv.unbind(0)
        q_BHLDh, k_BHLDh = self.q_norm(q_BHLDh), self.k_norm(k_BHLDh)
        if rope is not None:
            q_BHLDh, k_BHLDh = apply_rope_2d(q_BHLDh, *rope), apply_rope_2d(k_BHLDh, *rope)
        out = F.scaled_dot_product_attention(q_BHLDh, k_BHLDh, v_BHLDh)
        return self.proj(out.transpose(1, 2).reshape(b, length, d))


class FeedForward(nn.Module):
    """Dense FFN D → F → D with biases (SwiGLU: D → 2F, gate ⊙ up → D)."""

    def __init__(self, dim: int, width: int, activation: str) -> None:
        super().__init__()
        self.activation = activation
        self.up = nn.Linear(dim, 2 * width if activation == "swiglu" else width)
        self.down = nn.Linear(width, dim)

    def forward(self, x: Tensor) -> Tensor:
        h = self.up(x)
        if self.activation == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        elif self.activation == "silu":
            h = F.silu(h)
        else:
            h = F.gelu(h, approximate="tanh")
        return self.down(h)


class DiTBlock(nn.Module):
    """adaLN-Zero block: x += g₁·Attn(mod(norm(x))); x += g₂·FFN(mod(norm(x))), shifts/scales/gates from c."""

    def __init__(self, cfg: DiTConfig, moe: bool) -> None:
        super().__init__()
        d = cfg.hidden
        self.norm1 = _norm(cfg.norm, d)
        self.attn = Attention(d, cfg.heads, cfg.qk_norm)
        self.norm2 = _norm(cfg.norm, d)
        if moe:
            # DSMoE's experts carry no biases at all, JiTMoE's have both: the output bias follows up_bias.
            self.ffn: nn.Module = MoEFeedForward(d, cfg.moe, out_bias=cfg.moe.up_bias)
        else:
            self.ffn = FeedForward(d, cfg.dense_width, cfg.dense_activation)
        self.adaLN_modulation = nn.Linear(d, 6 * d)

    def forward(self, x_BLD: Tensor, c_BD: Tensor, rope: tuple[Tensor, Tensor] | None) -> Tensor:
        mods = self.adaLN_modulation(F.silu(c_BD)).chunk(6, dim=-1)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods
        x_BLD = x_BLD + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x_BLD), shift_msa, scale_msa), rope)
        return x_BLD + gate_mlp.unsqueeze(1) * self.ffn(modulate(self.norm2(x_BLD), shift_mlp, scale_mlp))


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of t (256 wide, DiT's) → MLP → D."""

    def __init__(self, dim: int, scale: float, freq_dim: int = 256) -> None:
        super().__init__()
        self.scale, self.freq_dim = scale, freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t_B: Tensor) -> Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t_B.device, dtype=torch.float32) / half)
        args_BF = (t_B.float() * self.scale)[:, None] * freqs[None]
        return self.mlp(torch.cat([args_BF.cos(), args_BF.sin()], dim=-1).to(self.mlp[0].weight.dtype))


class DiT(nn.Module):
    """(z_t (B, C, H, W), t (B,) in [0, 1] with 1 = clean, labels (B,)) → prediction (B, C, H, W).

    t is the recipe's clean-time, 1 − σ of flow.py; callers work in σ and go through ``network_velocity``.
    """

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d, p, c = cfg.hidden, cfg.patch_size, cfg.in_channels
        patch_values = c * p * p
        if cfg.patch_bottleneck:
            self.x_embedder: nn.Module = nn.Sequential(
                nn.Linear(patch_values, cfg.patch_bottleneck, bias=False), nn.Linear(cfg.patch_bottleneck, d)
            )
        else:
            self.x_embedder = nn.Linear(patch_values, d)
        self.t_embedder = TimestepEmbedder(d, cfg.timestep_scale)
        # DiT: "important! This enables embedding dropout for CFG": row N is the null class.
        self.y_embedder = nn.Embedding(cfg.num_classes + 1, d)
        if "absolute" in cfg.positions:
            self.register_buffer("pos_embed", sincos_2d(d, cfg.grid), persistent=False)
        else:
            self.pos_embed = None
        if cfg.in_context_tokens:
            self.in_context_pos = nn.Parameter(torch.zeros(cfg.in_context_tokens, d))
        else:
            self.in_context_pos = None
        if "rope2d" in cfg.positions:
            head_dim = d // cfg.heads
            cos, sin = rope_2d_tables(head_dim, cfg.grid, cfg.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
            if cfg.in_context_tokens:  # from in_context_start on, the class tokens lead with identity rotations
                cos, sin = rope_2d_tables(head_dim, cfg.grid, cfg.rope_theta, prefix=cfg.in_context_tokens)
                self.register_buffer("rope_cos_ctx", cos, persistent=False)
                self.register_buffer("rope_sin_ctx", sin, persistent=False)
        self.use_rope = "rope2d" in cfg.positions
        self.blocks = nn.ModuleList(DiTBlock(cfg, cfg.is_moe_block(i)) for i in range(cfg.depth))
        self.out_channels = 2 * c if cfg.learn_sigma else c
        self.final_norm = _norm(cfg.norm, d)
        self.final_modulation = nn.Linear(d, 2 * d)
        self.final_linear = nn.Linear(d, p * p * self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's init: xavier linears, N(0, 0.02) embeddings, zero adaLN and output (each block starts as identity)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for module in self.modules():
            if isinstance(module, MoEFeedForward) and module.num_experts:
                module.reset_parameters()  # the router follows its own MoEConfig.router_init
                with torch.no_grad():  # each routed expert xavier-initialised like the dense linears
                    for w_EXY in (module.w_up, module.w_down):
                        bound = math.sqrt(6 / (w_EXY.shape[1] + w_EXY.shape[2]))
                        w_EXY.uniform_(-bound, bound)
                    if module.b_up is not None:
                        module.b_up.zero_()
        nn.init.normal_(self.y_embedder.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        if self.in_context_pos is not None:
            nn.init.normal_(self.in_context_pos, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation.weight)
            nn.init.zeros_(block.adaLN_modulation.bias)
        for layer in (self.final_modulation, self.final_linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    @property
    def null_class(self) -> int:
        """Label index of the unconditional (dropped) class."""
        return self.cfg.num_classes

    def forward(self, z_BCHW: Tensor, t_B: Tensor, y_B: Tensor) -> Tensor:
        cfg = self.cfg
        b, _, h, w = z_BCHW.shape
        if (h, w) != (cfg.image_size, cfg.image_size) or z_BCHW.shape[1] != cfg.in_channels:
            raise ValueError(
                f"input {tuple(z_BCHW.shape[1:])}: the model takes ({cfg.in_channels}, {cfg.image_size}, "
                f"{cfg.image_size})"
            )
        x_BLD = self.x_embedder(pack(z_BCHW, cfg.patch_size))
        if self.pos_embed is not None:
            x_BLD = x_BLD + self.pos_embed.to(x_BLD.dtype)
        y_emb_BD = self.y_embedder(y_B)
        c_BD = self.t_embedder(t_B) + y_emb_BD
        rope = (self.rope_cos, self.rope_sin) if self.use_rope else None
        for i, block in enumerate(self.blocks):
            if self.in_context_pos is not None and i == cfg.in_context_start:
                context_BKD = y_emb_BD[:, None] + self.in_context_pos[None]
                x_BLD = torch.cat([context_BKD.to(x_BLD.dtype), x_BLD], dim=1)
            if self.use_rope and self.in_context_pos is not None and i >= cfg.in_context_start:
                rope = (self.rope_cos_ctx, self.rope_sin_ctx)
            x_BLD = block(x_BLD, c_BD, rope)
        x_BLD = x_BLD[:, cfg.in_context_tokens :] if self.in_context_pos is not None else x_BLD
        shift_BD, scale_BD = self.final_modulation(F.silu(c_BD)).chunk(2, dim=-1)
        out_BLP = self.final_linear(modulate(self.final_norm(x_BLD), shift_BD, scale_BD))
        out_BCHW = unpack(out_BLP, cfg.patch_size, h, w)
        # learn_sigma's variance half is never trained by a flow objective: only the prediction is returned.
        return out_BCHW[:, : cfg.in_channels]


def param_counts(model: DiT) -> dict[str, int]:
    """Trainable parameters: total, and activated by one token (shared experts, router, top-k of E routed)."""
    total = sum(p.numel() for p in model.parameters())
    inactive = 0
    for module in model.modules():
        if isinstance(module, MoEFeedForward) and module.num_experts:
            routed = sum(p.numel() for p in (module.w_up, module.b_up, module.w_down) if p is not None)
            inactive += routed * (module.num_experts - module.top_k) // module.num_experts
    return {"total": total, "activated": total - inactive}


# --- sampling: the network in flow.py's convention -------------------------------------------------------

ModelFn = Callable[[Tensor, Tensor, Tensor], Tensor]
"""A DiT-convention network: (z (B, C, H, W), clean-time t = 1 − σ (B,), labels (B,)) → its prediction."""


def network_velocity(
    model: ModelFn,
    z_BCHW: Tensor,
    sigma_B: Tensor,
    labels_B: Tensor,
    prediction: str,
    min_sigma: float = SAMPLE_PREDICTION_MIN_SIGMA,
) -> Tensor:
    """flow.py's velocity ε − x at noise level σ from the network, which reads t = 1 − σ.

    A "v" network predicts the recipe's dz/dt = x − ε, the negative of ε − x; an "x" network's x̂ goes through
    ``flow.to_velocity`` as a "sample" prediction, (z − x̂)/max(σ, min_sigma) (JiT's t_eps clamp on 1 − t).
    """
    out_BCHW = model(z_BCHW, 1 - sigma_B, labels_B)
    if prediction == "v":
        return -out_BCHW
    if prediction != "x":
        raise ValueError(f"prediction={prediction!r}: allowed {', '.join(PREDICTIONS)}")
    return to_velocity(out_BCHW, z_BCHW, sigma_B, "sample", min_sigma)


def class_velocity(
    model: ModelFn, labels_B: Tensor, null_class: int, prediction: str, min_sigma: float = SAMPLE_PREDICTION_MIN_SIGMA
) -> VelocityFn:
    """flow.py's ``velocity(z, sigma_B, conditional)`` for ``labels_B``: the labels (True), the null class (False)
    or both stacked, labels first (None, batched guidance)."""

    def velocity(z_BCHW: Tensor, sigma_B: Tensor, conditional: bool | None) -> Tensor:
        null_B = torch.full_like(labels_B, null_class)
        if conditional is None:
            y_B = torch.cat([labels_B, null_B])
        else:
            y_B = labels_B if conditional else null_B
        return network_velocity(model, z_BCHW, sigma_B, y_B, prediction, min_sigma)

    return velocity


@dataclass
class SamplerConfig:
    """How ``sample`` generates: flow.py's ODE integrator, its steps and classifier-free guidance."""

    method: str = "euler"
    """"euler" (DSMoE: 250 steps) or "heun" (JiT: 50 steps; the last step is Euler, where x-prediction's
    1/σ would divide by t_eps)."""
    steps: int = 50
    """Integration steps S on a uniform σ grid from 1 to 0 (``flow.sampling_schedule`` without shift)."""
    cfg_scale: float = 1.0
    """Guidance s: v = v_uncond + s·(v_cond − v_uncond); 1 = no guidance (one model call per evaluation)."""
    cfg_interval: tuple[float, float] = (0.0, 1.0)
    """Guidance only while lo <= t <= hi in the recipe's clean-time t = 1 − σ (JiT: (0.1, 1.0), i.e. σ <= 0.9),
    conditional velocity elsewhere."""
    t_eps: float = 0.05
    """Floor on σ = 1 − t when turning an x-prediction into a velocity (JiT's t_eps, flow.to_velocity's min_sigma)."""

    def __post_init__(self) -> None:
        if self.method not in SAMPLERS:
            raise ValueError(f"method={self.method!r}: allowed values are {', '.join(SAMPLERS)}")
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps={self.steps!r}: must be a positive integer")
        if not self.cfg_scale >= 0:
            raise ValueError(f"cfg_scale={self.cfg_scale!r}: must be >= 0")
        lo, hi = self.cfg_interval
        if not 0 <= lo <= hi <= 1:
            raise ValueError(f"cfg_interval={self.cfg_interval!r}: must satisfy 0 <= lo <= hi <= 1")
        if not 0 < self.t_eps < 1:
            raise ValueError(f"t_eps={self.t_eps!r}: must be in (0, 1)")

    @property
    def sigma_interval(self) -> tuple[float, float]:
        """``cfg_interval`` as noise levels: lo <= t <= hi is 1 − hi <= σ <= 1 − lo."""
        lo, hi = self.cfg_interval
        return 1 - hi, 1 - lo


@torch.no_grad()
def sample(
    model: ModelFn, noise_BCHW: Tensor, labels_B: Tensor, null_class: int, prediction: str, cfg: SamplerConfig
) -> Tensor:
    """Images (B, C, H, W) of ``labels_B`` from the noise at σ = 1, by ``flow.ode_sample`` (guidance batched)."""
    velocity = class_velocity(model, labels_B, null_class, prediction, cfg.t_eps)
    return ode_sample(
        velocity,
        noise_BCHW,
        cfg.steps,
        cfg.cfg_scale,
        batch_cfg=True,
        method=cfg.method,
        cfg_interval=cfg.sigma_interval,
    )


__all__ = [
    "DiTConfig",
    "DiT",
    "param_counts",
    "network_velocity",
    "class_velocity",
    "SamplerConfig",
    "sample",
]

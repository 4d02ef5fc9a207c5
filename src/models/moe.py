"""Mixture-of-Experts feed-forward layer: shared experts plus top-k routed experts, token or expert choice.

One layer serves both seeds. Dense2MoE (arXiv 2510.09094) converts a dense FFN into "1S12E2A": one shared
expert of a quarter of the FFN width, twelve routed experts of 1/16 each, top-2 (activated FFN 37.5 %, total
parameters unchanged). The DSMoE recipe (arXiv 2512.01252) uses sigmoid gates, top-k renormalisation, a route
scale of 2.0-2.5 and DeepSeek-V3's aux-loss-free balancing bias.

Dispatch is the sorted grouped-GEMM pattern (docs/design.md §7.1): the T·K (token, expert)
pairs are stably sorted by expert, token rows gathered with ``index_select`` (``x[idx]`` has a ~5x slower
backward on CPU), one grouped matmul per projection, the gate multiplied on the narrow hidden (exact, since
the down projection is linear without bias), then the combine: the N rows are put back in (token, choice) order
with a permutation gather and each token's K outputs are summed in fp32 in that fixed order, so the result is
deterministic on every device (``index_add_`` would use atomics on CUDA). Shapes are static (N = T·K rows), counts
come from a scatter-add and nothing reads a tensor value on the host: no GPU sync, no graph break, except in the
split-loop fallback (``grouped_mm`` unavailable or widths misaligned).

Expert choice (``routing="expert_choice"``; Zhou et al., arXiv 2202.09368; EC-DiT, arXiv 2410.02098; DiffMoE,
arXiv 2503.14487): each expert takes the C = min(L, ⌈capacity_factor·L·K/E⌉) tokens of a pool of L with the highest
scores, so on average a token gets capacity_factor·K experts, some tokens none (they keep the shared experts and the
output bias) and some up to E. Every expert gets exactly C tokens per pool: balanced by construction, which is why
it takes no balance loss and no selection bias (``balance`` must be "none"). The picked pairs come out expert-major
with static counts, so the same gather → grouped matmul → gate dispatch runs; the combine adds each expert's rows
into an fp32 accumulator with one ``index_add_`` per expert (an expert's tokens are distinct, so no row is written
twice in one call) in expert order: deterministic on every device. Pools (``pool``): "batch" is every token of the
call (DiffMoE's batch pool), "sample" the L = x.shape[-2] tokens of each leading index (EC-DiT's per-image pool; a
2-D input is one sample). Caveat for diffusion: with a batch pool a sample's routing depends on the other samples
of the batch — CFG's conditional and unconditional halves, the batch size at sampling — which per-sample pools avoid.

Precision: the router computes its logits in fp32 from the input in its own dtype; only the (T, E) logits are
kept, never an fp32 copy of the (T, D) input (≈ 4 GB per 1024² sample at FLUX.1-dev width across its 95 MoE layers
would otherwise be held for the backward).

Legend: T tokens (all leading dims flattened), D model width, E routed experts, K top-k, N = T·K
(token, expert) pairs (expert choice: N = E·M), P expert-choice pools, C tokens each expert takes per pool, M = P·C
tokens each expert takes, S shared experts, F_s shared expert width, F_e routed expert width, H up-projection
width (F_e, or 2·F_e for SwiGLU), L MoE layers of a model.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

ACTIVATIONS = ("gelu_tanh", "gelu", "silu", "swiglu")
GATES = ("softmax", "sigmoid")
BALANCES = ("aux", "aux_free", "none")
ROUTER_INITS = ("zeros", "normal", "centroids")
ROUTINGS = ("token_choice", "expert_choice")
POOLS = ("batch", "sample")
_LAYOUT_RE = re.compile(r"(\d+)S(\d+)E(\d+)A")


@dataclass
class MoEConfig:
    """Layout and routing of one MoE feed-forward layer (widths may be derived from the dense FFN width)."""

    num_experts: int = 12
    """Routed experts E (0 = shared experts only)."""
    top_k: int = 2
    """Routed experts per token K (expert choice: on average, with capacity_factor 1; 0 = shared experts only); the
    layer's ``top_k`` can change at inference."""
    num_shared: int = 1
    """Shared experts S, always active (0 = none)."""
    expert_width: int | None = None
    """Hidden width F_e of each routed expert; None derives it from the dense FFN width (layout_widths)."""
    shared_width: int | None = None
    """Hidden width F_s of each shared expert; None derives it from the dense FFN width (layout_widths)."""
    activation: str = "gelu_tanh"
    """Expert activation: "gelu_tanh" (FLUX), "gelu", "silu" or "swiglu" (up-projection holds [gate; up])."""
    gate: str = "softmax"
    """Router score function: "softmax" over experts or per-expert "sigmoid" (DSMoE / DeepSeek-V3)."""
    renormalize: bool = False
    """Rescale the K selected gates of each token to sum to 1."""
    route_scale: float = 1.0
    """Factor on the routed output's gates (DSMoE uses 2.0-2.5 with sigmoid gates)."""
    balance: str = "aux"
    """Balancing: "aux" (Switch/GShard loss E·Σ f_i·P_i), "aux_free" (DeepSeek-V3 selection bias), "none"."""
    aux_loss_weight: float = 1e-2
    """Weight of the balance loss (Dense2MoE's λ_balance = 0.01); used when balance == "aux"."""
    z_loss_weight: float = 0.0
    """Weight of the router z-loss mean(logsumexp(logits)²) (ST-MoE); 0 = off."""
    bias_update_rate: float = 1e-3
    """Step size γ of the aux-loss-free bias update bias_e += γ·sign(mean_load − load_e)."""
    router_init: str = "zeros"
    """Initial router: "zeros", "normal" (std 0.02) or "centroids" (zeros until the conversion fills them)."""
    up_bias: bool = True
    """Biases on the shared and routed up-projections (FLUX's FFNs have them; DSMoE's SwiGLU experts do not)."""
    record_neurons: bool = False
    """Keep the persistent ``dense_neurons`` buffer: the dense FFN neuron behind each hidden unit (the conversion
    sets it, so a LoRA trained on the dense model can be mapped onto the experts later: src/models/lora.py)."""
    routing: str = "token_choice"
    """"token_choice" (each token its top-K experts) or "expert_choice" (each expert its top-C tokens of a pool)."""
    capacity_factor: float = 1.0
    """Expert choice: each expert takes C = min(L, ceil(capacity_factor·L·K/E)) of a pool's L tokens (1: K per token)."""
    pool: str = "batch"
    """Expert-choice token pool: "batch" (every token of the call, DiffMoE) or "sample" (dim -2 of each sample)."""

    def __post_init__(self) -> None:
        for name in ("num_experts", "top_k", "num_shared"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name}={value!r}: must be an integer >= 0")
        for name in ("expert_width", "shared_width"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise ValueError(f"{name}={value!r}: must be a positive integer or None (derived)")
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k={self.top_k}: must be <= num_experts={self.num_experts}")
        if self.num_experts == 0 and self.num_shared == 0:
            raise ValueError("num_experts=0 and num_shared=0: the layer needs at least one expert")
        for name, allowed in (
            ("activation", ACTIVATIONS),
            ("gate", GATES),
            ("balance", BALANCES),
            ("router_init", ROUTER_INITS),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r}: allowed values are {', '.join(allowed)}")
        if not self.route_scale > 0:
            raise ValueError(f"route_scale={self.route_scale!r}: must be > 0")
        for name in ("aux_loss_weight", "z_loss_weight", "bias_update_rate"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name}={getattr(self, name)!r}: must be >= 0")
        check_routing(self.routing, self.capacity_factor, self.pool, self.balance)

    @classmethod
    def from_layout(cls, layout: str, **overrides) -> MoEConfig:
        """Config for a named layout such as "1S12E2A", other fields from ``overrides``."""
        num_shared, num_experts, top_k = parse_layout(layout)
        return cls(num_shared=num_shared, num_experts=num_experts, top_k=top_k, **overrides)


def check_routing(routing: str, capacity_factor: float, pool: str, balance: str) -> None:
    """ValueError naming the field unless the routing fields are valid together (MoEConfig, ConversionConfig)."""
    for name, value, allowed in (("routing", routing, ROUTINGS), ("pool", pool, POOLS)):
        if value not in allowed:
            raise ValueError(f"{name}={value!r}: allowed values are {', '.join(allowed)}")
    number = isinstance(capacity_factor, (int, float)) and not isinstance(capacity_factor, bool)
    if not number or not 0 < capacity_factor < math.inf:
        raise ValueError(
            f"capacity_factor={capacity_factor!r}: must be a finite number > 0 (expert choice: each expert takes "
            "ceil(capacity_factor·L·K/E) of a pool's L tokens)"
        )
    if routing == "expert_choice" and balance != "none":
        raise ValueError(
            f"balance={balance!r} with routing='expert_choice': expert choice gives every expert the same number "
            "of tokens, there is nothing to balance; allowed: balance='none'"
        )


def parse_layout(name: str) -> tuple[int, int, int]:
    """ "<S>S<E>E<K>A" → (num_shared, num_experts, top_k); "1S12E2A" → (1, 12, 2) (Dense2MoE's notation)."""
    match = _LAYOUT_RE.fullmatch(name.strip()) if isinstance(name, str) else None
    if match is None:
        raise ValueError(
            f"layout={name!r}: expected '<S>S<E>E<K>A' (S shared, E routed experts, top-K), e.g. '1S12E2A'"
        )
    num_shared, num_experts, top_k = (int(g) for g in match.groups())
    if top_k > num_experts:
        raise ValueError(f"layout={name!r}: top-k {top_k} exceeds the {num_experts} routed experts")
    return num_shared, num_experts, top_k


def layout_widths(ffn_width: int, num_shared: int, num_experts: int, shared_fraction: float = 0.25) -> tuple[int, int]:
    """(shared_width, expert_width) splitting a dense FFN of width F with its parameter count preserved.

    Each shared expert takes shared_fraction·F, the routed experts split the rest evenly: 1S12E2A on F gives
    (F/4, F/16) (paper: expansion 4 → shared ratio 1 + 12 routed of ratio 0.25). Zero experts give width 0.
    """
    if ffn_width <= 0:
        raise ValueError(f"ffn_width={ffn_width}: must be positive")
    if not 0 < shared_fraction <= 1:
        raise ValueError(f"shared_fraction={shared_fraction}: must be in (0, 1]")
    shared_width = 0
    if num_shared > 0:
        exact = shared_fraction * ffn_width
        shared_width = round(exact)
        if shared_width == 0 or not math.isclose(shared_width, exact):
            raise ValueError(
                f"shared_fraction={shared_fraction}: times ffn_width={ffn_width} is not a whole width; "
                "allowed: fractions giving an integer width"
            )
    rest = ffn_width - num_shared * shared_width
    if rest < 0:
        raise ValueError(
            f"num_shared={num_shared}: {num_shared} shared experts of {shared_width} exceed ffn_width="
            f"{ffn_width}; allowed: num_shared * shared_fraction <= 1"
        )
    if num_experts == 0:
        if rest != 0:
            raise ValueError(
                f"num_experts=0 leaves {rest} of ffn_width={ffn_width} unused; allowed: num_experts > 0 or "
                "num_shared * shared_fraction == 1"
            )
        return shared_width, 0
    if rest == 0 or rest % num_experts != 0:
        raise ValueError(
            f"num_experts={num_experts}: the routed width {rest} (ffn_width={ffn_width} minus shared) "
            f"does not split evenly; allowed: num_experts dividing {rest}"
        )
    return shared_width, rest // num_experts


def _activate(h: Tensor, activation: str) -> Tensor:
    if activation == "gelu_tanh":
        return F.gelu(h, approximate="tanh")
    if activation == "gelu":
        return F.gelu(h)
    if activation == "silu":
        return F.silu(h)
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


def _compute_dtype(x: Tensor) -> torch.dtype:
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def grouped_mm_supported(dtype: torch.dtype, *widths: int) -> bool:
    """Whether ``F.grouped_mm`` can run: torch >= 2.9 and every row stride a multiple of 16 bytes.

    Eager CPU/CUDA accept fp32/fp16/bf16, but torch.compile's shape function (torch 2.13) accepts only bf16.
    """
    if not hasattr(F, "grouped_mm") or dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    if dtype != torch.bfloat16 and torch.compiler.is_compiling():
        return False
    itemsize = torch.empty((), dtype=dtype).element_size()
    return all(w * itemsize % 16 == 0 for w in widths)


def combine(acc_TD: Tensor, y_ND: Tensor, token_N: Tensor, order_N: Tensor, K: int, gather: bool) -> Tensor:
    """acc_TD += the K expert outputs of every token, in fp32 and in a fixed order (``acc_TD`` is fp32, changed).

    ``y_ND`` holds the outputs in expert-sorted order: row n belongs to token ``token_N[n]`` and is pair
    ``order_N[n]`` of the (token, choice) list. Without ``gather``, one ``index_add_`` — on the CPU it adds the rows
    one after another in index order: deterministic, one pass. CUDA's ``index_add_`` uses atomics (the order varies
    from run to run), so there (``gather``) a permutation gather puts the rows back in (token, choice) order (its
    backward writes each row once) and the K outputs of a token are summed in choice order.
    """
    if not gather:
        return acc_TD.index_add_(0, token_N, y_ND.float())
    rank_N = torch.empty_like(order_N).scatter_(0, order_N, torch.arange(order_N.numel(), device=order_N.device))
    y_TKD = y_ND.index_select(0, rank_N).view(-1, K, y_ND.shape[-1])
    return acc_TD.add_(y_TKD.sum(dim=1, dtype=torch.float32))


class RouterLogits(torch.autograd.Function):
    """logits_ET = W_ED·x_TDᵀ computed in fp32 (also under autocast), saving x in its own dtype for the backward.

    ``torch.mm(W.float(), x.float().T)`` would keep the fp32 copy of x alive until the backward; here the copy is a
    temporary of the forward (and of the backward), and what is saved is x itself, which the shared expert's
    up-projection saves anyway.
    """

    @staticmethod
    def forward(ctx, weight_ED: Tensor, x_TD: Tensor) -> Tensor:
        ctx.save_for_backward(weight_ED, x_TD)
        with torch.autocast(x_TD.device.type, enabled=False):
            return torch.mm(weight_ED.float(), x_TD.float().T)

    @staticmethod
    def backward(ctx, grad_ET: Tensor) -> tuple[Tensor | None, Tensor | None]:
        weight_ED, x_TD = ctx.saved_tensors
        grad_weight = grad_x = None
        with torch.autocast(x_TD.device.type, enabled=False):
            if ctx.needs_input_grad[0]:
                grad_weight = torch.mm(grad_ET, x_TD.float()).to(weight_ED.dtype)
            if ctx.needs_input_grad[1]:
                grad_x = torch.mm(grad_ET.T, weight_ED.float()).to(x_TD.dtype)
        return grad_weight, grad_x


def router_logits(weight_ED: Tensor, x_TD: Tensor) -> Tensor:
    """logits_ET in fp32: ``RouterLogits`` where a backward may follow, one plain fp32 GEMM where none can
    (sampling; the autograd Function's Python cost is a visible share of a small layer's forward)."""
    if torch.is_grad_enabled() and (weight_ED.requires_grad or x_TD.requires_grad):
        return RouterLogits.apply(weight_ED, x_TD)
    if torch.is_autocast_enabled(x_TD.device.type):
        with torch.autocast(x_TD.device.type, enabled=False):
            return torch.mm(weight_ED.float(), x_TD.float().T)
    return torch.mm(weight_ED.float(), x_TD.float().T)


class MoEFeedForward(nn.Module):
    """Shared experts (one fused dense MLP) + top-k routed experts; x (..., D) → (..., D)."""

    def __init__(self, dim: int, cfg: MoEConfig, out_bias: bool = True, ffn_width: int | None = None) -> None:
        """``ffn_width`` (default 4·dim) is the dense FFN width that unset expert widths are derived from."""
        super().__init__()
        if dim <= 0:
            raise ValueError(f"dim={dim}: must be positive")
        self.dim = dim
        self.cfg = cfg
        self.num_shared = cfg.num_shared
        self.num_experts = cfg.num_experts
        shared_width, expert_width = cfg.shared_width, cfg.expert_width
        if shared_width is None or expert_width is None:
            derived = layout_widths(ffn_width or 4 * dim, cfg.num_shared, cfg.num_experts)
            shared_width = derived[0] if shared_width is None else shared_width
            expert_width = derived[1] if expert_width is None else expert_width
        self.shared_width = shared_width if self.num_shared else 0
        self.expert_width = expert_width if self.num_experts else 0
        glu = 2 if cfg.activation == "swiglu" else 1
        S, E, F_s, F_e = self.num_shared, self.num_experts, self.shared_width, self.expert_width

        self.shared_up = nn.Linear(dim, glu * S * F_s, bias=cfg.up_bias) if S else None
        self.shared_down = nn.Linear(S * F_s, dim, bias=False) if S else None
        self.router = nn.Linear(dim, E, bias=False) if E else None
        self.w_up = nn.Parameter(torch.empty(E, dim, glu * F_e)) if E else None
        self.b_up = nn.Parameter(torch.empty(E, glu * F_e)) if E and cfg.up_bias else None
        self.w_down = nn.Parameter(torch.empty(E, F_e, dim)) if E else None
        # The dense FFN's down-projection bias, applied once whatever top_k is (also top_k == 0).
        self.out_bias = nn.Parameter(torch.zeros(dim)) if out_bias else None
        # DeepSeek-V3: the bias shifts which experts are selected, never the gate values.
        self.register_buffer("expert_bias", torch.zeros(E, dtype=torch.float32))
        # Assignments since the last update_expert_bias: sums gradient-accumulation micro-batches (activation
        # checkpointing recomputes double them all alike, which leaves sign(mean - load) unchanged).
        self.register_buffer("pending_counts", torch.zeros(E, dtype=torch.long), persistent=False)
        if cfg.record_neurons:
            # dense_neurons[j] = the dense FFN neuron of hidden unit j: the S·F_s shared units, then each expert's
            # F_e units in expert order (identity until the conversion writes the split it made).
            self.register_buffer("dense_neurons", torch.arange(S * F_s + E * F_e))

        self.top_k = cfg.top_k
        # A training forward records the load statistics (last_counts, last_probs_mean, last_topk_idx_TK, ...; the
        # balance losses need them); outside training only when this is set (``load_tracking``), so inference —
        # sampling, evaluation, an exported student in FluxPipeline — does no bookkeeping beyond routing.
        self.track_load = False
        # Every selected expert's gate is exactly 1.0 (checks that top_k = E reproduces the dense FFN).
        self.constant_gates = False
        # Use F.grouped_mm when torch and the widths allow it; False forces the split-loop fallback.
        self.use_grouped_mm = True
        self.aux_loss: Tensor = torch.zeros(())
        # This forward's local balance terms (counts_E, assignments, probs_mean_E, z_loss) for sync_balance_losses;
        # None when the layer did not route in training since the last clear_aux_losses.
        self.balance_terms: tuple[Tensor, int, Tensor, Tensor | None] | None = None
        self.last_counts: Tensor = torch.zeros(E, dtype=torch.long)
        self.last_probs_mean: Tensor = torch.zeros(E)
        # The last routed forward's expert choices (T, K), on the device, for load statistics by timestep; with
        # expert choice instead the tokens (E, M) each expert took, and the share of tokens no expert took.
        self.last_topk_idx_TK: Tensor | None = None
        self.last_token_idx_EM: Tensor | None = None
        self.last_dropped_share: Tensor = torch.zeros(())
        self.reset_parameters()

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        # module.to(bf16) must not round the selection bias: its γ-sized steps would vanish in bf16.
        if self.expert_bias.is_floating_point() and self.expert_bias.dtype != torch.float32:
            self.expert_bias = self.expert_bias.float()
        return self

    @property
    def top_k(self) -> int:
        return self._top_k

    @top_k.setter
    def top_k(self, k: int) -> None:
        if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= self.num_experts:
            raise ValueError(f"top_k={k!r}: must be an integer in [0, num_experts={self.num_experts}]")
        self._top_k = k

    @property
    def activated_width(self) -> int:
        """FFN hidden width one token activates: S·F_s + K·F_e."""
        return self.num_shared * self.shared_width + self.top_k * self.expert_width

    @property
    def total_width(self) -> int:
        """FFN hidden width over all experts: S·F_s + E·F_e (= the dense FFN width after conversion)."""
        return self.num_shared * self.shared_width + self.num_experts * self.expert_width

    def reset_parameters(self) -> None:
        """nn.Linear-style uniform init for the experts; router per ``cfg.router_init``."""
        if self.num_experts == 0:
            return
        with torch.no_grad():
            bound_up = 1 / math.sqrt(self.dim)
            self.w_up.uniform_(-bound_up, bound_up)
            if self.b_up is not None:
                self.b_up.uniform_(-bound_up, bound_up)
            bound_down = 1 / math.sqrt(self.expert_width)
            self.w_down.uniform_(-bound_down, bound_down)
            if self.cfg.router_init == "normal":
                self.router.weight.normal_(std=0.02)
            else:  # "zeros", or "centroids" which the conversion code writes later
                self.router.weight.zero_()

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, shared={self.num_shared}x{self.shared_width}, "
            f"experts={self.num_experts}x{self.expert_width}, top_k={self.top_k}, "
            f"activation={self.cfg.activation}, gate={self.cfg.gate}, balance={self.cfg.balance}"
            + (f", expert_choice(capacity={self.cfg.capacity_factor}, pool={self.cfg.pool})" if self._ec else "")
        )

    @property
    def _ec(self) -> bool:
        return self.cfg.routing == "expert_choice"

    def expert_matmul_path(self, dtype: torch.dtype) -> str:
        """Which grouped-matmul implementation the routed experts use for ``dtype``."""
        glu = 2 if self.cfg.activation == "swiglu" else 1
        widths = (self.dim, glu * self.expert_width, self.expert_width)
        if self.use_grouped_mm and grouped_mm_supported(dtype, *widths):
            return "torch.nn.functional.grouped_mm"
        return "split loop over experts (fallback)"

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.dim:
            raise ValueError(f"input width {x.shape[-1]} does not match the layer's dim={self.dim}")
        x_TD = x.reshape(-1, self.dim)
        dtype = _compute_dtype(x_TD)
        out_TD = self._shared(x_TD, dtype)
        if self.top_k > 0 and self._ec:
            pools = x_TD.shape[0] // max(x.shape[-2], 1) if self.cfg.pool == "sample" and x.dim() >= 3 else 1
            out_TD = self._routed_expert_choice(x_TD, out_TD, dtype, pools)
        elif self.top_k > 0:
            out_TD = self._routed(x_TD, out_TD, dtype)
        else:
            self.aux_loss = x_TD.new_zeros((), dtype=torch.float32)
            self.last_counts = torch.zeros(self.num_experts, dtype=torch.long, device=x.device)
            self.last_probs_mean = torch.zeros(self.num_experts, device=x.device)
        return out_TD.view(x.shape)

    def _shared(self, x_TD: Tensor, dtype: torch.dtype) -> Tensor:
        if self.shared_up is None:
            out_TD = x_TD.new_zeros(x_TD.shape, dtype=dtype)
            return out_TD if self.out_bias is None else out_TD + self.out_bias.to(dtype)
        h = _activate(self.shared_up(x_TD), self.cfg.activation)
        # The output bias rides in the shared down-projection's addmm for free.
        return F.linear(h, self.shared_down.weight, self.out_bias)

    def route(self, x_TD: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Router → (logits_ET, scores_ET, gates_TK, topk_idx_TK), computed in fp32 also under autocast.

        fp32 because bf16 logits flip near-tied choices. Expert-major (E, T) logits because on CPU the E-wide
        GEMM and the softmax run ~2x and ~15x faster across tokens (E = 12 is too narrow to vectorise along).
        """
        cfg, K = self.cfg, self.top_k
        logits_ET = router_logits(self.router.weight, x_TD)
        scores_ET = logits_ET.softmax(dim=0) if cfg.gate == "softmax" else logits_ET.sigmoid()
        scores_TE = scores_ET.T
        if cfg.balance == "aux_free":
            topk_idx_TK = torch.topk(scores_TE + self.expert_bias, K, dim=-1, sorted=False).indices
            gates_TK = scores_TE.gather(1, topk_idx_TK)
        else:
            gates_TK, topk_idx_TK = torch.topk(scores_TE, K, dim=-1, sorted=False)
        if cfg.renormalize:
            gates_TK = gates_TK / (gates_TK.sum(dim=-1, keepdim=True) + 1e-20)
        if cfg.route_scale != 1.0:
            gates_TK = gates_TK * cfg.route_scale
        if self.constant_gates:
            gates_TK = torch.ones_like(gates_TK)
        return logits_ET, scores_ET, gates_TK, topk_idx_TK

    def _routed(self, x_TD: Tensor, out_TD: Tensor, dtype: torch.dtype) -> Tensor:
        cfg, E, K = self.cfg, self.num_experts, self.top_k
        logits_ET, scores_ET, gates_TK, topk_idx_TK = self.route(x_TD)

        expert_N = topk_idx_TK.reshape(-1)
        order_N = torch.argsort(expert_N, stable=True)
        token_N = torch.div(order_N, K, rounding_mode="floor")
        sorted_expert_N = expert_N.index_select(0, order_N)
        gate_N = gates_TK.reshape(-1).index_select(0, order_N)
        # Scatter-add, not bincount: static output shape, so torch.compile keeps one graph.
        counts_E = torch.zeros(E, dtype=torch.long, device=x_TD.device)
        counts_E.scatter_add_(0, expert_N, torch.ones_like(expert_N))
        offs_E = counts_E.cumsum(0, dtype=torch.int32)

        x_ND = x_TD.to(dtype).index_select(0, token_N)
        h_NH = self._expert_matmul(x_ND, self.w_up.to(dtype), counts_E, offs_E)
        if self.b_up is not None:
            h_NH.add_(self.b_up.to(dtype).index_select(0, sorted_expert_N))
        h_NF = _activate(h_NH, cfg.activation)
        gate_N1 = gate_N.to(dtype).unsqueeze(-1)
        # In place when nothing needs the ungated hidden for a backward (inference).
        h_NF = h_NF * gate_N1 if h_NF.requires_grad or gate_N1.requires_grad else h_NF.mul_(gate_N1)
        y_ND = self._expert_matmul(h_NF, self.w_down.to(dtype), counts_E, offs_E)
        if self.training or self.track_load:
            self.last_topk_idx_TK = topk_idx_TK.detach()
            self._record(logits_ET, scores_ET, counts_E, expert_N.numel())
        else:
            self.aux_loss = logits_ET.new_zeros(())
        # Into the shared expert's fresh output (its backward does not need it), accumulated in fp32.
        acc_TD = out_TD if out_TD.dtype == torch.float32 else out_TD.float()
        return combine(acc_TD, y_ND, token_N, order_N, K, gather=x_TD.device.type != "cpu").to(dtype)

    def route_expert_choice(self, x_TD: Tensor, pools: int = 1) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Expert choice → (logits_ET, scores_ET, gates_EM, token_EM), in fp32 also under autocast.

        The T tokens are P pools of L = T/P consecutive tokens; in each pool expert e takes the C tokens with its
        highest scores (softmax over experts or sigmoid, per token, as for token choice): token_EM[e] lists them,
        gates_EM[e] holds e's scores for them. ``renormalize`` rescales the gates of a token to sum 1 over the
        experts that took it (one such expert → gate 1, no gradient to the router through that token).
        """
        cfg, E = self.cfg, self.num_experts
        logits_ET = router_logits(self.router.weight, x_TD)
        scores_ET = logits_ET.softmax(dim=0) if cfg.gate == "softmax" else logits_ET.sigmoid()
        L = scores_ET.shape[1] // pools
        C = min(L, math.ceil(cfg.capacity_factor * L * self.top_k / E))
        gates_EPC, idx_EPC = torch.topk(scores_ET.view(E, pools, L), C, dim=-1, sorted=False)
        start_P1 = torch.arange(pools, device=x_TD.device).unsqueeze(-1) * L
        token_EM = (idx_EPC + start_P1).view(E, -1)
        gates_EM = gates_EPC.view(E, -1)
        if cfg.renormalize:
            # (E, T) scatter without collisions, summed over experts in a fixed order: deterministic
            total_T = torch.zeros_like(scores_ET).scatter(1, token_EM, gates_EM).sum(dim=0)
            gates_EM = gates_EM / (total_T.index_select(0, token_EM.view(-1)).view_as(gates_EM) + 1e-20)
        if cfg.route_scale != 1.0:
            gates_EM = gates_EM * cfg.route_scale
        if self.constant_gates:
            gates_EM = torch.ones_like(gates_EM)
        return logits_ET, scores_ET, gates_EM, token_EM

    def _routed_expert_choice(self, x_TD: Tensor, out_TD: Tensor, dtype: torch.dtype, pools: int) -> Tensor:
        E, T = self.num_experts, x_TD.shape[0]
        logits_ET, scores_ET, gates_EM, token_EM = self.route_expert_choice(x_TD, pools)
        M = token_EM.shape[1]
        token_N = token_EM.reshape(-1)
        # Expert-major by construction, M rows per expert: static counts and offsets, no sort.
        counts_E = torch.full((E,), M, dtype=torch.long, device=x_TD.device)
        offs_E = torch.arange(1, E + 1, dtype=torch.int32, device=x_TD.device) * M

        x_ND = x_TD.to(dtype).index_select(0, token_N)
        h_NH = self._expert_matmul(x_ND, self.w_up.to(dtype), counts_E, offs_E)
        if self.b_up is not None:
            h_NH.view(E, M, -1).add_(self.b_up.to(dtype).unsqueeze(1))
        h_NF = _activate(h_NH, self.cfg.activation)
        gate_N1 = gates_EM.reshape(-1, 1).to(dtype)
        h_NF = h_NF * gate_N1 if h_NF.requires_grad or gate_N1.requires_grad else h_NF.mul_(gate_N1)
        y_ND = self._expert_matmul(h_NF, self.w_down.to(dtype), counts_E, offs_E)
        # A token gets 0..E outputs. One index_add_ per expert, whose M tokens are distinct (no row written twice,
        # so no atomics race on CUDA), in expert order into fp32: deterministic on every device.
        acc_TD = out_TD.float()
        for token_M, y_MD in zip(token_EM.unbind(0), y_ND.float().view(E, M, -1).unbind(0)):
            acc_TD.index_add_(0, token_M, y_MD)
        if self.training or self.track_load:
            with torch.no_grad():
                picked_T = torch.zeros(T, device=x_TD.device).index_fill_(0, token_N, 1.0)
                self.last_dropped_share = (T - picked_T.sum()) / max(T, 1)
            self.last_topk_idx_TK = None
            self.last_token_idx_EM = token_EM.detach()
            self._record(logits_ET, scores_ET, counts_E, token_N.numel())
        else:
            self.aux_loss = logits_ET.new_zeros(())
        return acc_TD.to(dtype)

    def _expert_matmul(self, a_NX: Tensor, w_EXY: Tensor, counts_E: Tensor, offs_E: Tensor) -> Tensor:
        if self.use_grouped_mm and grouped_mm_supported(a_NX.dtype, a_NX.shape[1], w_EXY.shape[2]):
            return F.grouped_mm(a_NX, w_EXY, offs=offs_E)
        # Fallback for torch < 2.9 or misaligned widths; the host needs the group sizes (a sync on GPU).
        chunks = a_NX.split(counts_E.tolist())
        return torch.cat([chunk @ w_EXY[e] for e, chunk in enumerate(chunks)])

    def _record(self, logits_ET: Tensor, scores_ET: Tensor, counts_E: Tensor, assignments: int) -> None:
        cfg = self.cfg
        probs_ET = scores_ET if cfg.gate == "softmax" else scores_ET / scores_ET.sum(dim=0, keepdim=True)
        probs_mean_E = probs_ET.mean(dim=1)
        self.last_counts = counts_E.detach()
        self.last_probs_mean = probs_mean_E.detach()
        aux_loss = logits_ET.new_zeros(())
        z_loss = None
        if self.training and assignments > 0:
            if cfg.balance == "aux" and cfg.aux_loss_weight > 0:
                # Switch/GShard: E·Σ f_i·P_i, f_i the fraction of the T·K assignments (no gradient), P_i the
                # mean router probability; equals 1 at perfect balance.
                fraction_E = counts_E.float() / assignments
                aux_loss = aux_loss + cfg.aux_loss_weight * self.num_experts * (fraction_E * probs_mean_E).sum()
            if cfg.z_loss_weight > 0:
                z_loss = cfg.z_loss_weight * logits_ET.logsumexp(dim=0).square().mean()
                aux_loss = aux_loss + z_loss
            if cfg.balance == "aux_free":
                self.pending_counts += counts_E.detach()
            self.balance_terms = (counts_E.detach(), assignments, probs_mean_E, z_loss)
        self.aux_loss = aux_loss

    def load_stats(self) -> dict[str, Tensor]:
        """Last forward's load: counts, load fraction, max/mean load (1 = balanced), router entropy (nats); with
        expert choice also the share of tokens no expert took."""
        if self.num_experts == 0:
            return {}
        counts_E = self.last_counts.float()
        probs_E = self.last_probs_mean.float().clamp_min(1e-12)
        probs_E = probs_E / probs_E.sum()
        return {
            "counts": self.last_counts,
            "load_fraction": counts_E / counts_E.sum().clamp_min(1),
            "max_over_mean_load": counts_E.max() / counts_E.mean().clamp_min(1e-12),
            "router_entropy": -(probs_E * probs_E.log()).sum(),
        } | ({"dropped_share": self.last_dropped_share} if self._ec else {})

    @torch.no_grad()
    def update_expert_bias(self, counts_E: Tensor | None = None) -> None:
        """DeepSeek-V3 aux-loss-free step bias_e += γ·sign(mean_load − load_e); no-op unless "aux_free".

        Call after the optimizer step. ``counts_E`` (e.g. ``pending_counts`` all-reduced over DDP ranks)
        defaults to this rank's ``pending_counts``, the assignments since the previous call; they are reset.
        """
        if self.cfg.balance != "aux_free" or self.num_experts == 0:
            return
        counts = self.pending_counts if counts_E is None else counts_E
        load_E = counts.to(device=self.expert_bias.device, dtype=torch.float32)
        self.expert_bias.add_(self.cfg.bias_update_rate * torch.sign(load_E.mean() - load_E))
        self.pending_counts.zero_()


def moe_layers(module: nn.Module) -> list[MoEFeedForward]:
    """All MoE layers inside ``module`` (in ``modules()`` order)."""
    return [m for m in module.modules() if isinstance(m, MoEFeedForward)]


def total_aux_loss(module: nn.Module) -> Tensor:
    """Sum of the layers' weighted balance + z-losses from their last forward (a zero scalar if none)."""
    losses = [layer.aux_loss for layer in moe_layers(module)]
    if not losses:
        return torch.zeros(())
    return torch.stack(losses).sum()


def clear_aux_losses(module: nn.Module) -> None:
    """Zero every layer's aux loss and forget its balance terms: call before a forward in which some layers may
    not run (blocks MoB skips), so they contribute neither a stale loss nor stale counts."""
    for layer in moe_layers(module):
        layer.aux_loss = torch.zeros((), device=layer.expert_bias.device)
        layer.balance_terms = None


def sync_balance_losses(module: nn.Module) -> None:
    """Recompute each layer's aux loss with the expert loads f_i of the whole data-parallel batch.

    A no-op unless torch.distributed is initialised with more than one rank. Every rank must call it once per
    forward, after the forward: one all-reduce of the (layers, E + 1) counts, never a collective inside a layer
    (MoB runs a layer on some ranks and skips it on others, which would deadlock). f_i (no gradient) is global;
    P_i stays local: rank r's term E·Σ f_i·P_i^r is scaled by R·T_r/T (T_r its routed tokens, T the global
    count), so the mean over ranks of the terms and of their gradients — what DDP and FSDP average — equals the
    single-process loss and gradient on the concatenated batch, even when MoB gives ranks unequal token counts.
    The z-loss, a per-token mean, gets the same R·T_r/T factor.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    layers = [layer for layer in moe_layers(module) if layer.num_experts > 0]
    if not layers:
        return
    world, width = dist.get_world_size(), max(layer.num_experts for layer in layers) + 1
    # per layer: E expert counts, then the layer's assignment count T·K (0 where it did not route)
    counts_LE = torch.zeros(len(layers), width, dtype=torch.float64, device=layers[0].expert_bias.device)
    for i, layer in enumerate(layers):
        if layer.balance_terms is not None:
            counts_E, assignments = layer.balance_terms[:2]
            counts_LE[i, : counts_E.numel()] = counts_E
            counts_LE[i, -1] = assignments
    local_L = counts_LE[:, -1].clone()
    dist.all_reduce(counts_LE)
    total_L1 = counts_LE[:, -1:].clamp_min(1)
    share_L = (world * local_L / total_L1[:, 0]).float()
    fraction_LE = (counts_LE[:, :-1] / total_L1).float()
    for i, layer in enumerate(layers):
        if layer.balance_terms is None:
            continue
        _, _, probs_mean_E, z_loss = layer.balance_terms
        aux_loss = probs_mean_E.new_zeros(())
        if layer.cfg.balance == "aux" and layer.cfg.aux_loss_weight > 0:
            weight = layer.cfg.aux_loss_weight * layer.num_experts * share_L[i]
            aux_loss = aux_loss + weight * (fraction_LE[i, : layer.num_experts] * probs_mean_E).sum()
        if z_loss is not None:
            aux_loss = aux_loss + share_L[i] * z_loss
        layer.aux_loss = aux_loss


@torch.no_grad()
def update_expert_biases(module: nn.Module) -> None:
    """DeepSeek-V3 aux-loss-free step on every "aux_free" layer of ``module``, from its loads since the last call.

    Call once per optimizer step (after it): the pending counts sum every gradient-accumulation micro-batch, and
    under DDP/FSDP they are summed over ranks first (one all-reduce), so every replica applies the same bias.
    Shared by the distillation stages and the DiT recipe.
    """
    layers = [m for m in moe_layers(module) if m.num_experts and m.cfg.balance == "aux_free"]
    if not layers:
        return
    counts = torch.cat([layer.pending_counts for layer in layers])
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(counts)
    for layer, counts_E in zip(layers, counts.split([m.num_experts for m in layers])):
        layer.update_expert_bias(counts_E)


def samples_independent(module: nn.Module) -> bool:
    """Whether every sample's output depends on that sample alone, so a batch may hold other samples (CFG's two
    branches in one call): false only for expert-choice layers with a batch-wide token pool."""
    return not any(layer._ec and layer.cfg.pool == "batch" for layer in moe_layers(module))


@contextlib.contextmanager
def load_tracking(module: nn.Module, on: bool) -> Iterator[None]:
    """Turn the MoE layers' load statistics on or off outside training (``MoEFeedForward.track_load``) for the
    duration; sampling and evaluation run with them off. Training forwards record them either way."""
    layers = moe_layers(module)
    saved = [layer.track_load for layer in layers]
    for layer in layers:
        layer.track_load = on
    try:
        yield
    finally:
        for layer, value in zip(layers, saved):
            layer.track_load = value


def set_layers_top_k(module: nn.Module, top_k: int) -> None:
    """Set the routed top-k of every MoE layer for the next forwards (a stage or a sampler switching it at run time);
    ``src.models.flux_moe.set_top_k`` also validates it and records it in the model config that is saved."""
    for layer in moe_layers(module):
        layer.top_k = top_k

"""Mixture of Blocks (MoB): per-sample routing over groups of consecutive FLUX transformer blocks.

Dense2MoE stage 3 (docs/design.md §2.7): consecutive blocks form groups of m; a router scores
TopK(α·W_x[x, c] + (1−α)·W_y·y, κ) with x, c the image and text tokens at the group input and y the AdaLN
conditioning (FLUX's ``temb``), so routing is per sample and per denoising step and only κ blocks run.
The paper leaves open how "κ adjacent blocks" follow from a TopK, how the discrete choice gets gradients, α, m, κ,
router init and which blocks are grouped: each is a ``MoBConfig`` field with its default documented there.

A skipped block must cost nothing (docs/design.md §7.4: compute-then-mask saves no time), so each block
runs on the sub-batch of samples that chose it (``index_select``) and is written back with ``index_copy``. At
inference with window selection the group sorts its samples by window once, and each block runs on a contiguous
slice of the sorted batch (one gather and one scatter per group and step, not per block).
A block no sample chose in a step gets no gradient (DDP needs ``find_unused_parameters=True``).

Legend: B batch, S samples routed to one block, L image tokens, N text tokens, D width, M blocks in a group (m),
W candidate windows of κ adjacent blocks (m − κ + 1).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

STREAMS = ("double", "single", "both")
SELECTIONS = ("window", "topk")
GATES = ("straight_through", "score")
ROUTER_INITS = ("zeros", "normal")


@dataclass
class MoBConfig:
    """Where MoB groups sit and how their routers choose; every default is our choice (the paper gives none).

    Selected blocks update h ← h + r·(block(h) − h) with r the router weight (``gate``), so the router is trained
    by the loss through r; unselected blocks pass h through untouched.
    """

    stream: str = "single"
    """Blocks that are grouped: "double", "single" or "both" (the paper's MoE-S/XS sizes fit dropping single blocks)."""
    group_size: int = 4
    """Consecutive blocks per group, m."""
    active: int = 2
    """Blocks each sample runs per group, κ (1 ≤ κ ≤ m); may be lowered at inference via ``MoBGroup.active``."""
    alpha: float = 0.5
    """Weight α of the content score W_x[pool(img), pool(txt)] against the conditioning score W_y·temb (in [0, 1])."""
    selection: str = "window"
    """"window": best of the m−κ+1 runs of κ adjacent blocks (paper: "κ adjacent blocks"); "topk": κ best blocks."""
    first: int = 0
    """First block index, within each grouped stream, of the range split into groups."""
    last: int | None = None
    """Last block index (inclusive) of that range; None = the stream's last block."""
    gate: str = "straight_through"
    """r = 1 in value with the chosen option's probability's gradient ("straight_through"), or n·p ("score")."""
    router_init: str = "zeros"
    """"zeros" (all windows tie at the start and the earliest wins) or "normal" (std ``router_init_std``)."""
    router_init_std: float = 0.02
    """Standard deviation of the "normal" router init."""
    temperature: float = 1.0
    """Softmax temperature of the router probabilities that carry the gradient."""

    def __post_init__(self) -> None:
        choices = {"stream": STREAMS, "selection": SELECTIONS, "gate": GATES, "router_init": ROUTER_INITS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"mob {name}={getattr(self, name)!r}: allowed values are {list(allowed)}")
        for name in ("group_size", "active"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"mob {name}={value!r}: must be an integer ≥ 1")
        if self.active > self.group_size:
            raise ValueError(f"mob active={self.active}: must be ≤ group_size={self.group_size}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"mob alpha={self.alpha}: must lie in [0, 1]")
        if not isinstance(self.first, int) or self.first < 0:
            raise ValueError(f"mob first={self.first!r}: must be an integer ≥ 0")
        if self.last is not None and (not isinstance(self.last, int) or self.last < self.first):
            raise ValueError(f"mob last={self.last!r}: must be None or an integer ≥ first={self.first}")
        if self.temperature <= 0:
            raise ValueError(f"mob temperature={self.temperature}: must be > 0")
        if self.router_init_std < 0:
            raise ValueError(f"mob router_init_std={self.router_init_std}: must be ≥ 0")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for a diffusers model config (``MoBConfig(**d)`` restores it)."""
        return asdict(self)


def _as_config(cfg: MoBConfig | dict[str, Any]) -> MoBConfig:
    return cfg if isinstance(cfg, MoBConfig) else MoBConfig(**cfg)


def group_spans(cfg: MoBConfig | dict[str, Any], num_double: int, num_single: int) -> list[tuple[str, int, int]]:
    """(stream, start, size) of every group, double-stream groups first, each stream in block order.

    The grouped range is split from its end, so blocks left over when its length is not a multiple of m are its
    first ones and always run: skipping early blocks hurts most (Flux.1-Lite's block-MSE analysis).
    """
    cfg = _as_config(cfg)
    spans = []
    for stream, num_blocks in (("double", num_double), ("single", num_single)):
        if cfg.stream not in (stream, "both"):
            continue
        last = num_blocks - 1 if cfg.last is None else cfg.last
        if last >= num_blocks:
            raise ValueError(f"mob last={cfg.last}: the {stream} stream has only {num_blocks} blocks")
        available = last - cfg.first + 1
        if cfg.group_size > available:
            raise ValueError(
                f"mob group_size={cfg.group_size}: larger than the {max(available, 0)} {stream} blocks available "
                f"in [first={cfg.first}, last={last}] of a stream with {num_blocks} blocks"
            )
        num_groups = available // cfg.group_size
        first_start = last + 1 - num_groups * cfg.group_size
        spans += [(stream, first_start + g * cfg.group_size, cfg.group_size) for g in range(num_groups)]
    return spans


def _unit(x_BD: Tensor) -> Tensor:
    # FLUX hidden states carry a few outlier channels orders of magnitude above the rest; normalising each pooled
    # input keeps router logits on one scale across blocks (our choice; the paper does not say).
    return F.layer_norm(x_BD, x_BD.shape[-1:])


class MoBGroup(nn.Module):
    """Router of one group of m consecutive blocks; called in place of the blocks with the block call contract.

    The blocks themselves stay where the model keeps them (``transformer_blocks`` / ``single_transformer_blocks``)
    and are passed to ``forward``, so checkpoints keep their parameter names. After each forward ``last_choice``
    (B, m) bool and ``last_scores`` (B, m) hold the routing for logging.
    """

    def __init__(self, cfg: MoBConfig, stream: str, start: int, dim: int) -> None:
        super().__init__()
        if stream not in ("double", "single"):
            raise ValueError(f"MoBGroup stream={stream!r}: allowed values are ['double', 'single']")
        self.stream = stream
        self.start = start
        self.size = cfg.group_size
        self.active = cfg.active
        self.alpha = cfg.alpha
        self.selection = cfg.selection
        self.gate = cfg.gate
        self.temperature = cfg.temperature
        # paper: α·W_x[x, c] + (1−α)·W_y·y; one bias (on W_y) is enough for a global preference per block
        self.router_x = nn.Linear(2 * dim, self.size, bias=False)
        self.router_y = nn.Linear(dim, self.size, bias=True)
        for layer in (self.router_x, self.router_y):
            if cfg.router_init == "zeros":
                nn.init.zeros_(layer.weight)
            else:
                nn.init.normal_(layer.weight, std=cfg.router_init_std)
        nn.init.zeros_(self.router_y.bias)
        self.last_choice: Tensor | None = None
        self.last_scores: Tensor | None = None

    def scores(self, hidden_states_BLD: Tensor, encoder_hidden_states_BND: Tensor, temb_BD: Tensor) -> Tensor:
        """Per-block router logits (B, m), computed in fp32."""
        content_B2D = torch.cat(
            [_unit(hidden_states_BLD.float().mean(1)), _unit(encoder_hidden_states_BND.float().mean(1))],
            dim=-1,
        )
        content_BM = F.linear(content_B2D, self.router_x.weight.float())
        cond_BM = F.linear(_unit(temb_BD.float()), self.router_y.weight.float(), self.router_y.bias.float())
        return self.alpha * content_BM + (1.0 - self.alpha) * cond_BM

    def route(
        self, hidden_states_BLD: Tensor, encoder_hidden_states_BND: Tensor, temb_BD: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Blocks chosen per sample (B, m) bool and r − 1 per sample and block (B, m), r the router weight."""
        m, k = self.size, self.active
        if not 1 <= k <= m:
            raise ValueError(f"MoBGroup active={k}: must lie in [1, group size {m}]")
        scores_BM = self.scores(hidden_states_BLD, encoder_hidden_states_BND, temb_BD)
        if self.selection == "window":
            window_BW = scores_BM.unfold(1, k, 1).sum(-1)
            best_B = window_BW.argmax(-1)
            pos_M = torch.arange(m, device=scores_BM.device)
            choice_BM = (pos_M >= best_B[:, None]) & (pos_M < best_B[:, None] + k)
            probs_BW = torch.softmax(window_BW / self.temperature, dim=-1)
            prob_BM = probs_BW.gather(1, best_B[:, None]).expand(-1, m)
            num_options = m - k + 1
        else:
            topk_idx_BK = scores_BM.topk(k, dim=-1).indices
            choice_BM = torch.zeros_like(scores_BM, dtype=torch.bool).scatter(1, topk_idx_BK, True)
            prob_BM = torch.softmax(scores_BM / self.temperature, dim=-1)
            num_options = m
        if self.gate == "straight_through":
            excess_BM = prob_BM - prob_BM.detach()
        else:
            excess_BM = num_options * prob_BM - 1.0
        self.last_choice = choice_BM.detach()
        self.last_scores = scores_BM.detach()
        return choice_BM, excess_BM

    def forward(
        self,
        blocks: Sequence[nn.Module],
        hidden_states: Tensor,
        encoder_hidden_states: Tensor,
        temb: Tensor,
        image_rotary_emb: tuple[Tensor, Tensor] | None = None,
        joint_attention_kwargs: dict[str, Any] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Run the group's blocks on the samples that chose them; returns (encoder_hidden_states, hidden_states).

        ``image_rotary_emb`` has no batch dimension and is shared by every sub-batch; tensors with a batch
        dimension inside ``joint_attention_kwargs`` (IP-adapter states) are not sub-batched.
        """
        if len(blocks) != self.size:
            raise ValueError(f"MoBGroup got {len(blocks)} blocks: expected its size {self.size}")
        h_BLD, e_BND, temb_BD = hidden_states, encoder_hidden_states, temb
        batch = h_BLD.shape[0]
        choice_BM, excess_BM = self.route(h_BLD, e_BND, temb_BD)
        # straight-through r − 1 is 0 in value: only needed where gradients flow; a dense group then stays exact
        weighted = self.gate == "score" or torch.is_grad_enabled()
        if self.selection == "window" and not torch.is_grad_enabled():
            return self._forward_sorted(
                blocks,
                choice_BM,
                excess_BM if weighted else None,
                h_BLD,
                e_BND,
                temb_BD,
                image_rotary_emb,
                joint_attention_kwargs,
            )
        # one host sync per group: per-sample routing gives data-dependent sub-batch sizes
        counts_M = choice_BM.sum(0).tolist()
        samples_MB = torch.argsort((~choice_BM).T.to(torch.uint8), dim=1, stable=True)
        for i, block in enumerate(blocks):
            count = counts_M[i]
            if count == 0:
                continue
            full = count == batch
            idx_S = samples_MB[i, :count]
            h_SLD = h_BLD if full else h_BLD.index_select(0, idx_S)
            e_SND = e_BND if full else e_BND.index_select(0, idx_S)
            temb_SD = temb_BD if full else temb_BD.index_select(0, idx_S)
            e_out_SND, h_out_SLD = block(
                hidden_states=h_SLD,
                encoder_hidden_states=e_SND,
                temb=temb_SD,
                image_rotary_emb=image_rotary_emb,
                joint_attention_kwargs=joint_attention_kwargs,
            )
            if weighted:
                # h + r·(block(h) − h) written as block(h) + (r − 1)·(block(h) − h)
                excess_S = excess_BM[:, i] if full else excess_BM[:, i].index_select(0, idx_S)
                excess_S11 = excess_S.to(h_out_SLD.dtype)[:, None, None]
                h_out_SLD = h_out_SLD + excess_S11 * (h_out_SLD - h_SLD)
                e_out_SND = e_out_SND + excess_S11 * (e_out_SND - e_SND)
            if full:
                h_BLD, e_BND = h_out_SLD, e_out_SND
            else:
                h_BLD = h_BLD.index_copy(0, idx_S, h_out_SLD)
                e_BND = e_BND.index_copy(0, idx_S, e_out_SND)
        return e_BND, h_BLD

    def _forward_sorted(
        self,
        blocks: Sequence[nn.Module],
        choice_BM: Tensor,
        excess_BM: Tensor | None,
        h_BLD: Tensor,
        e_BND: Tensor,
        temb_BD: Tensor,
        image_rotary_emb: tuple[Tensor, Tensor] | None,
        joint_attention_kwargs: dict[str, Any] | None,
    ) -> tuple[Tensor, Tensor]:
        """Inference with window selection: one gather and one scatter per group instead of per block.

        The samples are sorted by the first block of their window; block i then runs on the samples whose window
        starts in [i − κ + 1, i], a contiguous run of the sorted batch, so each block reads a view and writes its
        result back in place. Same blocks per sample as ``forward``'s per-block gathers (outputs equal up to
        float rounding of the different sub-batch shapes); no autograd, so only under ``torch.no_grad``.
        """
        m, k = self.size, self.active
        windows = m - k + 1
        first_B = choice_BM.to(torch.uint8).argmax(dim=1)  # the window's first block (choices are adjacent)
        order_B = torch.argsort(first_B, stable=True)
        # one host sync per group: the sub-batch bounds are data-dependent
        counts_W = torch.zeros(windows, dtype=torch.long, device=first_B.device)
        counts_W.scatter_add_(0, first_B, torch.ones_like(first_B))
        bounds = [0, *counts_W.cumsum(0).tolist()]
        sorted_all = bounds[1] == bounds[-1]  # every sample in window 0: the order is the identity, no gather
        h_BLD = h_BLD if sorted_all else h_BLD.index_select(0, order_B)
        e_BND = e_BND if sorted_all else e_BND.index_select(0, order_B)
        temb_BD = temb_BD if sorted_all else temb_BD.index_select(0, order_B)
        if excess_BM is not None and not sorted_all:
            excess_BM = excess_BM.index_select(0, order_B)
        batch = h_BLD.shape[0]
        for i, block in enumerate(blocks):
            a, b = bounds[max(0, i - k + 1)], bounds[min(i, windows - 1) + 1]
            if a == b:
                continue
            h_SLD, e_SND = h_BLD[a:b], e_BND[a:b]
            e_out_SND, h_out_SLD = block(
                hidden_states=h_SLD,
                encoder_hidden_states=e_SND,
                temb=temb_BD[a:b],
                image_rotary_emb=image_rotary_emb,
                joint_attention_kwargs=joint_attention_kwargs,
            )
            if excess_BM is not None:
                excess_S11 = excess_BM[a:b, i].to(h_out_SLD.dtype)[:, None, None]
                h_out_SLD = h_out_SLD + excess_S11 * (h_out_SLD - h_SLD)
                e_out_SND = e_out_SND + excess_S11 * (e_out_SND - e_SND)
            if (
                b - a == batch
            ):  # the whole batch: take the outputs (with sorted_all, the caller's input is never written)
                h_BLD, e_BND = h_out_SLD, e_out_SND
            else:  # a slice of this group's own gathered (or previously produced) tensors
                h_SLD.copy_(h_out_SLD)
                e_SND.copy_(e_out_SND)
        if sorted_all:
            return e_BND, h_BLD
        return torch.empty_like(e_BND).index_copy_(0, order_B, e_BND), torch.empty_like(h_BLD).index_copy_(
            0, order_B, h_BLD
        )

    def extra_repr(self) -> str:
        return (
            f"stream={self.stream!r}, start={self.start}, size={self.size}, active={self.active}, "
            f"selection={self.selection!r}, gate={self.gate!r}"
        )


def build_mob_groups(cfg: MoBConfig | dict[str, Any], num_double: int, num_single: int, dim: int) -> nn.ModuleList:
    """One ``MoBGroup`` per group of ``group_spans``, in the same order."""
    cfg = _as_config(cfg)
    spans = group_spans(cfg, num_double, num_single)
    return nn.ModuleList(MoBGroup(cfg, stream, start, dim) for stream, start, _ in spans)


def mob_groups(module: nn.Module) -> list[MoBGroup]:
    """All MoB groups inside a model, in registration order."""
    return [m for m in module.modules() if isinstance(m, MoBGroup)]


def group_output_blocks(cfg: MoBConfig | dict[str, Any], num_double: int, num_single: int) -> list[tuple[str, int]]:
    """(stream, index of the group's last block) per group: the dense teacher's feature the group-feature loss
    matches (paper: output of the last block of the corresponding group in the original model)."""
    return [(stream, start + size - 1) for stream, start, size in group_spans(cfg, num_double, num_single)]


def active_blocks(cfg: MoBConfig | dict[str, Any], num_double: int, num_single: int) -> tuple[int, int]:
    """(double, single) blocks each sample runs per denoising step."""
    cfg = _as_config(cfg)
    skipped = {"double": 0, "single": 0}
    for stream, _, size in group_spans(cfg, num_double, num_single):
        skipped[stream] += size - cfg.active
    return num_double - skipped["double"], num_single - skipped["single"]

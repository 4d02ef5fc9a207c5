"""Per-GPU memory of one distillation stage, from the structure of teacher and student (both may be on meta).

What a stage holds (``src/training/precision.py`` says which dtype each lives in):

- teacher: its parameters in the teacher's dtype, frozen (no gradients, no optimizer state);
- student: trained parameters fp32, frozen ones in the compute dtype (fp32 under FSDP, which flattens a block's
  trained and frozen parameters into one fp32 tensor);
- gradients: fp32, one per trained parameter; under FSDP one per element of every unit (block) that holds a
  trained parameter, because a flat unit gets one gradient tensor;
- optimizer: AdamW's two fp32 moments per trained parameter;
- activations: what the student's blocks save for the backward, the block outputs both models keep for the
  feature loss, and the fp32 copies the loss makes of them under bf16;
- transient: one block's working set (its saved activations once more: the gradients flowing through it in the
  backward) and, under FSDP, the gathered units (two student blocks in the compute dtype, one teacher block, one
  unsharded fp32 gradient unit before its reduce-scatter).

FSDP divides teacher, student, gradients and optimizer state by the number of GPUs; activations are per GPU.
The peak is teacher + student + optimizer + max(activations + transient, gradients + one fp32 AdamW temporary
per trained parameter): the backward frees activations block by block while the gradients fill in.

Activations per block are ``c_block · B · L · D`` bytes, with ``c_block`` (bytes per token per unit of width)
measured, not guessed: a replica of the block at width 64 with the same class, MoE layout (widths scaled), top-k
and trained parameters runs forward under the stage's dtypes while a ``saved_tensors_hooks`` counts the storages
autograd keeps; the slope between two token counts removes per-sample terms (AdaLN modulation, weight casts).
Everything a block saves per token is a multiple of D (heads × head_dim = D, FFN and expert widths ∝ D), so the
constant transfers to FLUX.1-dev's width. Activation checkpointing keeps each block's inputs instead and
recomputes one block at a time. ``tests/test_memory_plan.py`` checks the plan against the measured allocation peak
of a small CPU stage.

Legend: B batch per GPU, L tokens (text + image), D width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.models.transformers.transformer_flux import FluxPosEmbed
from torch import nn
from torch.profiler import ProfilerActivity, profile

from src.models.flux_moe import FluxMoETransformer2DModel, init_config
from src.models.mob import mob_groups
from src.models.moe import moe_layers

REPLICA_WIDTH = 64
"""Width D of the replica blocks whose saved activations are counted (4 heads of 16)."""

STREAMS = {"double": "transformer_blocks", "single": "single_transformer_blocks"}


@dataclass(frozen=True)
class StageSetup:
    """What decides a stage's memory besides the structure of its models."""

    trained: frozenset[str]
    """Names of the student parameters the stage trains."""
    compute_dtype: torch.dtype
    """Frozen student parameters and activations (bf16 under "bf16-mixed")."""
    teacher_dtype: torch.dtype
    """The teacher's parameters and block outputs."""
    batch_size: int
    """Samples per GPU and step (one micro-batch)."""
    image_tokens: int
    """Image tokens per sample (FLUX: (H/16)·(W/16))."""
    text_tokens: int
    """Text tokens per sample (FLUX: 512)."""
    gpus: int = 1
    """Processes the stage runs on; FSDP shards model state over them."""
    fsdp: bool = False
    """FSDP with one unit per block (``auto_wrap_policy: blocks``)."""
    checkpointing: bool = False
    """Activation checkpointing of the student's blocks."""
    top_k: int | None = None
    """Routed experts per token in this stage (stage 1: 0); None keeps the student's."""
    kind: str = "moe_kd"
    """Stage kind: "mob_kd" matches one feature per MoB group, the others one per block."""

    def __post_init__(self) -> None:
        for name in ("batch_size", "image_tokens", "gpus"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 1")
        if self.text_tokens < 0:
            raise ValueError(f"text_tokens={self.text_tokens}: must be >= 0")


def _bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _units(model: nn.Module) -> list[list[tuple[str, nn.Parameter]]]:
    """FSDP units of ``auto_wrap_policy: blocks``: each block, then everything else as one unit."""
    units, in_blocks = [], set()
    for attr in STREAMS.values():
        for i, block in enumerate(getattr(model, attr)):
            prefix = f"{attr}.{i}."
            units.append([(prefix + n, p) for n, p in block.named_parameters()])
            in_blocks |= {prefix + n for n, _ in block.named_parameters()}
    units.append([(n, p) for n, p in model.named_parameters() if n not in in_blocks])
    return units


def plan_stage(teacher: nn.Module, student: nn.Module, setup: StageSetup) -> dict[str, int]:
    """Bytes per GPU of each component (teacher, student, gradients, optimizer, activations, transient) and the peak.

    The peak is not their sum: activations are gone by the time all gradients exist (see the end of the function).
    """
    s = setup
    shard = s.gpus if s.fsdp else 1
    compute = _bytes(s.compute_dtype)
    frozen = 4 if s.fsdp else compute
    teacher_bytes = _bytes(s.teacher_dtype)
    params = dict(student.named_parameters())
    unknown = s.trained - params.keys()
    assert not unknown, f"trained parameters not in the student: {sorted(unknown)[:3]}"
    n_trained = sum(params[n].numel() for n in s.trained)
    n_student = sum(p.numel() for p in params.values())
    n_teacher = sum(p.numel() for p in teacher.parameters())
    if s.fsdp:
        units = _units(student)
        grad_numel = sum(sum(p.numel() for _, p in u) for u in units if any(n in s.trained for n, _ in u))
    else:
        grad_numel = n_trained

    D = student.inner_dim
    BLD = s.batch_size * (s.image_tokens + s.text_tokens) * D
    constants = block_constants(student, s)
    fraction = _mob_fractions(student) if s.kind == "mob_kd" else {}
    saved = 0.0
    for key, c in constants.items():
        if s.checkpointing:  # the block's inputs (image and text hidden states) stay; it is recomputed later
            saved += BLD * compute
        else:
            saved += c * BLD * fraction.get(key, 1.0)
    one_block = max((c * fraction.get(key, 1.0) for key, c in constants.items()), default=0.0) * BLD
    if s.checkpointing:
        saved += one_block  # the block being recomputed holds its activations again
    pairs = len(mob_groups(student)) if s.kind == "mob_kd" else len(constants)
    # kept block outputs (text + image) of both models; F.mse_loss saves fp32 copies of bf16 ones
    taps = pairs * BLD * (compute + teacher_bytes + (4 if compute < 4 else 0) + (4 if teacher_bytes < 4 else 0))
    transient = one_block
    if s.fsdp:
        largest = max(sum(p.numel() for _, p in u) for u in _units(student)[:-1] or [[]])
        largest_teacher = max(sum(p.numel() for _, p in u) for u in _units(teacher)[:-1] or [[]])
        transient += 2 * largest * compute + largest_teacher * teacher_bytes + largest * 4
    out = {
        "teacher": n_teacher * teacher_bytes // shard,
        "student": (n_trained * 4 + (n_student - n_trained) * frozen) // shard,
        "gradients": grad_numel * 4 // shard,
        "optimizer": n_trained * 8 // shard,
        "activations": int(saved + taps),
        "transient": int(transient),
    }
    # Activations are freed block by block in the backward while the gradients fill in; AdamW's foreach step then
    # adds one fp32 temporary per trained parameter (its sqrt of the second moment) while the gradients are alive.
    static = out["teacher"] + out["student"] + out["optimizer"]
    out["peak"] = static + max(out["activations"] + out["transient"], out["gradients"] + out["optimizer"] // 2)
    return out


def _mob_fractions(student: nn.Module) -> dict[tuple[str, int], float]:
    """Share of the samples each grouped block runs for: κ of m on average."""
    out = {}
    for g in mob_groups(student):
        for i in range(g.start, g.start + g.size):
            out[(g.stream, i)] = g.active / g.size
    return out


# --- per-block activation constants, measured on replicas ----------------------------------------------------------
def block_constants(student: nn.Module, setup: StageSetup) -> dict[tuple[str, int], float]:
    """Bytes the student's block (stream, i) saves for the backward per token per unit of width, in this stage.

    Blocks with the same class, the same trained parameter names and a gradient-carrying input (or not) share one
    measurement; a frozen block before the first trained one saves nothing.
    """
    replica = _replica(student, setup.top_k)
    measured: dict[tuple, float] = {}
    out = {}
    in_blocks = tuple(f"{attr}." for attr in STREAMS.values())
    # a block's input carries a gradient once anything before it trains (the embedders, or an earlier block)
    grad_in = any(not n.startswith(in_blocks) and not n.startswith("mob_groups.") for n in setup.trained)
    for stream, attr in STREAMS.items():
        for i, block in enumerate(getattr(student, attr)):
            prefix = f"{attr}.{i}."
            trained = frozenset(n[len(prefix) :] for n in setup.trained if n.startswith(prefix))
            key = (stream, type(block).__name__, trained, grad_in)
            if key not in measured:
                measured[key] = _measure(getattr(replica, attr)[0], trained, setup.compute_dtype, grad_in)
            out[(stream, i)] = measured[key]
            grad_in = grad_in or bool(trained)
    return out


def _scaled(width: int | None, factor: float) -> int | None:
    return None if width is None else max(1, round(width * factor))


def _replica(student: nn.Module, top_k: int | None) -> nn.Module:
    """One double and one single block of the student's classes and layout at width ``REPLICA_WIDTH``, on CPU."""
    config = init_config(student) if isinstance(student, FluxMoETransformer2DModel) else dict(student.config)
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    factor = REPLICA_WIDTH / student.inner_dim
    moe = config.get("moe")
    if moe is not None:
        moe = dict(moe)
        moe["shared_width"] = _scaled(moe.get("shared_width"), factor)
        moe["expert_width"] = _scaled(moe.get("expert_width"), factor)
    widths = {loc: _scaled(w, factor) for loc, w in (config.get("ffn_widths") or {}).items()} or None
    config |= {
        "patch_size": 1,
        "in_channels": 16,
        "out_channels": None,
        "num_layers": min(1, config["num_layers"]),
        "num_single_layers": min(1, config["num_single_layers"]),
        "attention_head_dim": 16,
        "num_attention_heads": REPLICA_WIDTH // 16,
        "joint_attention_dim": 16,
        "pooled_projection_dim": 16,
        "guidance_embeds": False,
        "axes_dims_rope": (4, 6, 6),
        "moe": moe,
        "ffn_widths": widths,
        "mob": None,
        "kept_double": None,
        "kept_single": None,
    }
    with torch.device("cpu"):
        torch.manual_seed(0)
        replica = FluxMoETransformer2DModel(**config)
    for layer in moe_layers(replica):
        if top_k is not None:
            layer.top_k = top_k
        torch.nn.init.normal_(layer.router.weight, std=0.02)  # spread tokens over experts as training does
    return replica.train()


def _measure(block: nn.Module, trained: frozenset[str], compute_dtype: torch.dtype, grad_in: bool) -> float:
    """Saved-for-backward bytes per token per unit of width of ``block`` (slope between two token counts)."""
    saved = []
    with torch.no_grad():
        for name, p in block.named_parameters():
            p.requires_grad_(name in trained)
            p.data = p.data.to(torch.float32 if name in trained else compute_dtype)
    for image, text in ((64, 16), (128, 32)):
        saved.append(_saved_bytes(block, image, text, compute_dtype, grad_in))
    return (saved[1] - saved[0]) / ((128 + 32 - 64 - 16) * REPLICA_WIDTH)


def _saved_bytes(block: nn.Module, image: int, text: int, compute_dtype: torch.dtype, grad_in: bool) -> int:
    gen = torch.Generator().manual_seed(0)
    D = REPLICA_WIDTH
    hidden = torch.randn(1, image, D, generator=gen).to(compute_dtype).requires_grad_(grad_in)
    encoder = torch.randn(1, text, D, generator=gen).to(compute_dtype).requires_grad_(grad_in)
    temb = torch.randn(1, D, generator=gen).to(compute_dtype)
    ids = torch.cat([torch.zeros(text, 3), torch.randint(0, 16, (image, 3), generator=gen).float()])
    rotary = FluxPosEmbed(theta=10000, axes_dim=[4, 6, 6])(ids)
    # parameters and the rotary tables are not activations (the tables are shared by every block and sample)
    excluded = {t.untyped_storage().data_ptr() for t in [*block.parameters(), *rotary]}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr and ptr not in excluded:
            kept[ptr] = t.untyped_storage().nbytes()
        return t

    autocast = torch.autocast("cpu", dtype=compute_dtype, enabled=compute_dtype != torch.float32)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
        block(hidden, encoder, temb, rotary)
    return sum(kept.values())


def format_plan(plans: dict[str, dict[str, int]], settings: dict[str, dict[str, object]]) -> str:
    """A markdown table: one column per stage, one row per component, in GiB."""
    names = list(plans)
    rows = ["teacher", "student", "gradients", "optimizer", "activations", "transient", "peak"]
    lines = ["| per GPU (GiB) | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for row in rows:
        cells = [f"{plans[n][row] / 2**30:.2f}" for n in names]
        label = f"**{row}**" if row == "peak" else row
        lines.append(f"| {label} | " + " | ".join(f"**{c}**" if row == "peak" else c for c in cells) + " |")
    for key in next(iter(settings.values()), {}):
        lines.append(f"| {key} | " + " | ".join(str(settings[n][key]) for n in names) + " |")
    return "\n".join(lines)


__all__ = ["StageSetup", "block_constants", "format_plan", "plan_stage"]


def allocation_peak(fn) -> int:
    """Highest sum of CPU allocations minus frees while ``fn`` runs (bytes above what was live before), from
    torch.profiler's memory events: what the plan is checked against on the CPU."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns()
    )
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak

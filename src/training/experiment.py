"""A Dense2MoE experiment: teacher → (prune) → Taylor scores → MoE student → stages in order → evaluation.

This module defines the YAML's sections and checks them; ``python -m src.cli fit --config experiments/moe_s.yaml``
calls ``run_experiment`` (src/training/runner.py) when the YAML has ``stages``. Each stage is
its own Lightning ``Trainer.fit`` and its own MLflow run, nested under one parent run per experiment; a stage's
exported student feeds the next. Rerunning the same command skips finished stages and resumes an interrupted one
from its newest checkpoint; a finished stage whose recorded configuration differs from the current one is refused
rather than reused or overwritten. The recorded configuration (``Experiment.stage_fingerprint``) is what changes
results, not where a stage runs: its ``trainer`` section (src/training/trainer_spec.py) may change between runs
as long as the global batch stays the same.

Layout of ``output_dir``: ``experiment.json`` (parent run id, fingerprint), ``taylor_scores.safetensors``,
``<stage>/checkpoints/``, ``<stage>/student/`` (diffusers folder) and ``<stage>/done.json``, ``report/``.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import docstring_parser
from lightning.pytorch.callbacks import Callback

from src.config_files import include_chain
from src.content_hash import content_hash
from src.dtypes import DTYPES
from src.errors import UserError
from src.models.compute_schedule import as_lists, check_schedule
from src.models.convert import ConversionConfig
from src.models.mob import MoBConfig
from src.models.moe import parse_layout
from src.training.distill import StageSpec
from src.training.trainer_spec import TrainerSpec


@dataclass
class TeacherSpec:
    """The dense teacher."""

    path: str = "checkpoints/teacher_tiny"
    """diffusers folder of a ``FluxTransformer2DModel``, a FLUX pipeline folder or a hub id (with ``subfolder``)."""
    subfolder: str | None = None
    """Subfolder inside ``path`` (``transformer`` for a full FLUX pipeline folder)."""
    dtype: str = "float32"
    """Precision the teacher is loaded in: "float32", "bfloat16" (FLUX.1-dev) or "float16"."""
    preset: str | None = "teacher-tiny"
    """Config preset ("flux-dev", "teacher-tiny", "tiny") used to count parameters without weights."""
    expected: dict[str, Any] = field(default_factory=dict)
    """Config entries the checkpoint must have (a mismatch is refused)."""
    guidance: float = 3.5
    """Guidance value fed to a guidance-distilled teacher (and its student)."""

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"teacher.dtype={self.dtype!r}; allowed {list(DTYPES)}")


@dataclass
class PruneSpec:
    """Pruning baselines in the same machinery."""

    kind: str = "width"
    """"width" (Taylor neuron pruning of every FFN, Diff-Pruning style) or "depth" (block removal)."""
    ffn_fraction: float = 0.375
    """width: fraction of each FFN's neurons kept (0.375 = MoE 1S12E2A's activated FFN)."""
    keep_double: int | None = None
    """depth: double-stream blocks kept (None = all)."""
    keep_single: int | None = None
    """depth: single-stream blocks kept (None = all)."""
    rank: str = "mse"
    """depth: "mse" (FLUX.1-Lite: keep blocks that change their input most) or "pattern" (BK-SDM-like fixed)."""

    def __post_init__(self) -> None:
        if self.kind not in ("width", "depth"):
            raise ValueError(f"student.prune.kind={self.kind!r}; allowed ['width', 'depth']")
        if self.rank not in ("mse", "pattern"):
            raise ValueError(f"student.prune.rank={self.rank!r}; allowed ['mse', 'pattern']")
        if not 0 < self.ffn_fraction <= 1:
            raise ValueError(f"student.prune.ffn_fraction={self.ffn_fraction}; allowed (0, 1]")


@dataclass
class StudentSpec:
    """How the student is made from the teacher."""

    conversion: ConversionConfig | None = None
    """Dense → MoE conversion (None: the student stays dense, e.g. a pruning baseline)."""
    mob: MoBConfig | None = None
    """Mixture of Blocks groups, added before the first mob_kd stage."""
    prune: PruneSpec | None = None
    """Pruning applied to the teacher copy before conversion."""


@dataclass
class TaylorSpec:
    """Calibration for Taylor importance scores."""

    batches: int = 8
    """Calibration batches (noise levels spread evenly over [0, 1] across them)."""
    batch_size: int = 32
    """Images per calibration batch."""
    loss: str = "flow"
    """"flow" (flow-matching loss on data) or "distill" (MSE to the teacher's guided velocity)."""

    def __post_init__(self) -> None:
        if self.loss not in ("flow", "distill"):
            raise ValueError(f"taylor.loss={self.loss!r}; allowed ['flow', 'distill']")


@dataclass
class EvalSpec:
    """The evaluation at the end of every fit (teacher and student, same prompts, same noise)."""

    prompts_per_task: int = 32
    """Held-out prompts per GenEval task."""
    images_per_prompt: int = 4
    """Images per prompt."""
    steps: int = 20
    """Euler sampling steps."""
    cfg_scale: float = 2.0
    """Classifier-free guidance scale."""
    shift: float | None = None
    """Timestep shift of the sampling schedule (None: the teacher's config ``sampling_shift``, else 1)."""
    batch_size: int = 128
    """Images per generation batch."""
    latency_batch: int = 16
    """Images per batch when timing teacher and student sampling."""
    enabled: bool = True
    """Run the evaluation."""
    teacher_cache: str | None = None
    """Folder that keeps the teacher's evaluation images by a hash of its weights, prompts, seed and sampler, so
    runs against one teacher (a sweep's variants) generate them once (None: always generate)."""
    top_k_schedule: list[tuple[float, int]] | None = None
    """Student's routed top-k as a function of σ while sampling, [[σ_max, k], …] from σ_max = 1.0 down (e.g.
    [[1.0, 2], [0.5, 1]]: k = 2 for σ > 0.5, else 1); the report's activated params and FLOPs are then trajectory
    averages (None: the trained top-k at every step)."""
    mob_active_schedule: list[tuple[float, int]] | None = None
    """Student's MoB active blocks κ as a function of σ, in the same form (None: the trained κ at every step)."""

    def __post_init__(self) -> None:
        for name in ("prompts_per_task", "images_per_prompt", "steps", "batch_size", "latency_batch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"evaluation.{name}={value!r}: must be an integer >= 1")
        if self.cfg_scale < 0:
            raise ValueError(f"evaluation.cfg_scale={self.cfg_scale}: must be >= 0")
        if self.shift is not None and self.shift <= 0:
            raise ValueError(f"evaluation.shift={self.shift}: must be > 0 (or null: the teacher's own)")
        for name in ("top_k_schedule", "mob_active_schedule"):
            # kept as lists: the experiment is dumped to YAML (sweep trial configs, fingerprints)
            setattr(self, name, as_lists(check_schedule(getattr(self, name), f"evaluation.{name}")))


@dataclass
class DataSpec:
    """Training data: the procedural shapes world, or latent shards written by ``prepare-data``."""

    kind: str = "shapes"
    """"shapes" (rendered on the fly) or "latents" (FLUX latents + T5/CLIP embeddings from prepare-data)."""
    image_size: int = 32
    """Image side in pixels (latents: the side ``params`` counts FLOPs at; the data's own is in its manifest)."""
    seed: int = 0
    """Training stream seed (each stage offsets it)."""
    snap: int = 8
    """shapes: object boxes on a grid of this many pixels (match the teacher's training data; 1 = free). The
    default is the committed teacher's world: a 4×4 board of 8-pixel cells."""
    cells: bool = True
    """shapes: one object per ``snap``-pixel cell (match the teacher's training data)."""
    path: str | None = None
    """latents: prepare-data output folder or object-store URL (s3://, gs://, …)."""
    num_workers: int = 0
    """latents: DataLoader worker processes."""
    verify: str = "size"
    """latents: local shard check before training: "none", "size" or "hash" (sha256 of every chunk)."""
    cache_dir: str | None = None
    """latents: local cache for chunks streamed from an object store (default: litdata's)."""

    def __post_init__(self) -> None:
        if self.kind not in DATA_KINDS:
            raise ValueError(f"data.kind={self.kind!r}; allowed {list(DATA_KINDS)}")
        if self.kind == "latents" and not self.path:
            raise ValueError("data.path: required for data.kind=latents (a prepare-data output folder or URL)")
        if self.verify not in ("none", "size", "hash"):
            raise ValueError(f"data.verify={self.verify!r}; allowed ['none', 'size', 'hash']")


DATA_KINDS = ("shapes", "latents")
RUNTIME_FIELDS = ("num_workers", "verify", "cache_dir")
"""Fields that cannot change a result: left out of stage fingerprints."""
LATER_FIELDS = {"dtype": "float32", "kind": "shapes", "path": None}
"""Fields added after stage folders already existed: fingerprinted only when set, so those folders still resume."""
LATER_CONVERSION_FIELDS = {"z_loss_weight": 0.0, "bias_update_rate": 1e-3, "up_bias": True}
"""The same for ``student.conversion`` (ConversionConfig)."""


def recipe(spec: Any) -> dict[str, Any]:
    """A spec's fields as far as they change results (see RUNTIME_FIELDS, LATER_FIELDS)."""
    return {
        k: v
        for k, v in asdict(spec).items()
        if k not in RUNTIME_FIELDS and not (k in LATER_FIELDS and v == LATER_FIELDS[k])
    }


def batch_layout(batch_size: int, world_size: int, accumulate: int) -> dict[str, int]:
    """How a stage's optimizer step is made of samples, as far as results go.

    A step trains on the global batch of ``batch_size × world_size × accumulate`` samples (world size = devices ×
    nodes). Ranks are interchangeable: rank r's slice of data and noise is the r-th slice of what one process with
    the whole batch draws, and every statistic a loss uses (feature-loss normalisers, expert loads) is all-reduced
    over the ranks, so R devices × batch b train as 1 device × batch R·b, up to float rounding (tests/test_ddp.py;
    on prepared latents litdata deals the shards to the ranks, so the samples match per epoch, not per step).
    Micro-batches are not interchangeable with ranks: those statistics are per micro-batch, and rank r's
    micro-batch m holds rows (r·A + m)·b … of the global batch (src/training/accumulation.py), so with A > 1 the
    micro-batches hold other samples when R changes. Hence: the global batch alone when A = 1; with A > 1 also A
    and the world size (which together with the global batch fix b).
    """
    layout = {"global_batch": batch_size * world_size * accumulate}
    if accumulate > 1:
        layout |= {"accumulate_grad_batches": accumulate, "world_size": world_size}
    return layout


def stage_recipe(spec: StageSpec) -> dict[str, Any]:
    """What a stage's result depends on: its own keys with ``batch_size`` × the world size × accumulation as the
    global batch (``batch_layout``); none of its ``trainer`` section (accelerator, devices, num_nodes, strategy,
    checkpoint_every, extra Trainer arguments), which says where it runs, not what it trains. Precision and
    gradient clipping are stage keys and stay in. A strategy (DDP, FSDP, activation checkpointing) changes results
    only by float rounding, as the device count does; FSDP's own ``mixed_precision`` dtypes (which tensors are held
    and reduced in bf16 under a bf16 ``precision``) round differently too and are not fingerprinted either.
    """
    own = {k: v for k, v in spec.as_dict().items() if k not in ("trainer", "batch_size", "accumulate_grad_batches")}
    world = (spec.trainer or TrainerSpec()).world_size()
    return own | batch_layout(spec.batch_size, world, spec.accumulate_grad_batches)


def legacy_stage_recipe(spec: StageSpec) -> dict[str, Any]:
    """A resolved stage as fingerprints described it before the trainer section: every key of the stage, the
    launcher settings flat beside the others (so a stage folder started then still resumes with the same config)."""
    trainer = spec.trainer or TrainerSpec()
    extra = dict(trainer.extra) | ({"num_nodes": trainer.num_nodes} if trainer.num_nodes is not None else {})
    legacy = {k: v for k, v in spec.as_dict().items() if k != "trainer"}
    return legacy | {
        "checkpoint_every": trainer.checkpoint_every,
        "accelerator": trainer.accelerator,
        "devices": trainer.devices,
        "strategy": trainer.strategy,
        "extra_trainer": extra,
    }


def with_trainer_defaults(stages: list[StageSpec], trainer: TrainerSpec | None) -> list[StageSpec]:
    """The stages with their trainer sections resolved over the experiment's ``trainer`` section (and the
    defaults); a setting a stage cannot use (an FSDP strategy for mob_kd) is refused naming the stage."""
    try:
        return [s.with_defaults(trainer) for s in stages]
    except ValueError as err:
        raise UserError(f"trainer: {err}") from None


def validate_order(stages: list[StageSpec], student: StudentSpec) -> None:
    """Stages in an impossible order are refused before anything runs."""
    if not stages:
        raise UserError("stages: an experiment needs at least one stage")
    names = [s.name for s in stages]
    if len(set(names)) != len(names):
        raise UserError(f"stages: names must be unique, got {names}")
    seen_mob = False
    for i, s in enumerate(stages):
        where = f"stage {i} ({s.name!r}, kind {s.kind})"
        if s.kind in ("shared_kd", "moe_kd") and student.conversion is None:
            raise UserError(f"{where}: needs student.conversion (an MoE student)")
        if s.kind == "dense_kd" and student.conversion is not None:
            raise UserError(f"{where}: dense_kd is for dense/pruned students; this student is MoE (use moe_kd)")
        if s.kind == "shared_kd" and any(p.kind in ("moe_kd", "mob_kd") for p in stages[:i]):
            raise UserError(f"{where}: shared_kd (stage 1) must come before moe_kd and mob_kd stages")
        if s.kind == "mob_kd":
            if student.mob is None:
                raise UserError(f"{where}: needs student.mob (Mixture of Blocks groups)")
            seen_mob = True
        elif seen_mob:
            raise UserError(f"{where}: cannot follow a mob_kd stage (the student's blocks are grouped by then)")
    if student.prune is not None and student.prune.kind == "depth" and student.mob is not None:
        raise UserError("student: depth pruning and MoB groups cannot be combined")


def validate_schedules(evaluation: EvalSpec | None, student: StudentSpec, data: DataSpec | None) -> None:
    """Compute schedules the evaluated student cannot follow are refused before anything runs."""
    if evaluation is None:
        return
    top_k, kappa = evaluation.top_k_schedule, evaluation.mob_active_schedule
    if (top_k or kappa) and data is not None and data.kind == "latents":
        raise UserError(
            "evaluation.top_k_schedule / mob_active_schedule: the prepared-latents evaluation has no sampler"
        )
    if top_k:
        if student.conversion is None:
            raise UserError("evaluation.top_k_schedule: the student has no MoE layers (student.conversion is null)")
        num_experts = parse_layout(student.conversion.layout)[1]
        if max(k for _, k in top_k) > num_experts:
            raise UserError(f"evaluation.top_k_schedule={top_k}: top-k above the layout's {num_experts} routed experts")
    if kappa:
        if student.mob is None:
            raise UserError("evaluation.mob_active_schedule: the student has no MoB groups (student.mob is null)")
        if max(k for _, k in kappa) > student.mob.group_size:
            raise UserError(
                f"evaluation.mob_active_schedule={kappa}: κ above the group size m={student.mob.group_size}"
            )


@dataclass
class Experiment:
    """Everything an experiment YAML holds (the arguments of ``run_experiment``)."""

    name: str
    teacher: TeacherSpec
    student: StudentSpec
    stages: list[StageSpec]
    taylor: TaylorSpec
    evaluation: EvalSpec
    data: DataSpec
    output_dir: Path
    seed: int
    experiment_name: str
    tracking_uri: str | None
    callbacks: list[Callback] = field(default_factory=list)
    mlflow_parent_run_id: str | None = None
    trainer: TrainerSpec = field(default_factory=TrainerSpec)
    """The experiment's trainer section: defaults for every stage's (the stages hold them resolved)."""

    def __post_init__(self) -> None:
        self.stages = with_trainer_defaults(self.stages, self.trainer)

    def _student_recipe(self) -> dict[str, Any]:
        student = asdict(self.student)
        if student.get("conversion"):
            student["conversion"] = {
                k: v
                for k, v in student["conversion"].items()
                if not (k in LATER_CONVERSION_FIELDS and v == LATER_CONVERSION_FIELDS[k])
            }
        return student

    def _fingerprint(self, index: int, stage_recipe_of) -> str:
        return content_hash(
            {
                "teacher": recipe(self.teacher),
                "student": self._student_recipe(),
                "taylor": asdict(self.taylor),
                "data": recipe(self.data),
                "seed": self.seed,
                "stages": [stage_recipe_of(s) for s in self.stages[: index + 1]],
            }
        )

    def stage_fingerprint(self, index: int) -> str:
        """What a stage's result depends on: teacher, student recipe, Taylor calibration, data, seed and the
        stages up to it (``stage_recipe``: their training keys and global batch, not where they run). A stage
        folder recording another fingerprint is refused; one started on 1 device × batch 32 resumes on 2 × 16."""
        return self._fingerprint(index, stage_recipe)

    def legacy_stage_fingerprint(self, index: int) -> str:
        """The fingerprint of the same configuration as stage folders recorded it before the trainer section."""
        return self._fingerprint(index, legacy_stage_recipe)

    def matches(self, index: int, recorded: str) -> bool:
        """Whether a stage folder's recorded fingerprint is this configuration's (also in the earlier form)."""
        return recorded in (self.stage_fingerprint(index), self.legacy_stage_fingerprint(index))


def is_experiment_config(path: str) -> bool:
    """True for an experiment YAML (``stages`` in it or in a file it includes) rather than a LightningCLI config."""
    try:
        chain = include_chain(Path(path))
    except UserError:  # unreadable: the parser that runs next reports it
        return False
    return any("stages" in data for _, data in chain)


def yaml_keys() -> str:
    """Every key an experiment YAML may hold, one line each with its default and docstring (``fit --help``)."""
    lines = ["experiment YAML keys (each also works on the command line as --key.path value):"]

    def walk(cls: type, prefix: str) -> None:
        docs = {
            p.arg_name: " ".join((p.description or "").split()) for p in docstring_parser.parse_from_object(cls).params
        }
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            inner = [t for t in typing.get_args(hints[f.name]) or (hints[f.name],) if dataclasses.is_dataclass(t)]
            if inner:
                walk(inner[0], f"{prefix}{f.name}.")
                continue
            default = f.default if f.default is not dataclasses.MISSING else None
            if f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            shown = (
                "(required)"
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
                else f"= {default!r}"
            )
            lines.append(f"  {prefix}{f.name} {shown}  {docs.get(f.name, '')}")

    lines.append("  name (required)  Experiment name (parent MLflow run name; default output folder runs/<name>).")
    for key, cls in (("teacher", TeacherSpec), ("student", StudentSpec), ("taylor", TaylorSpec)):
        walk(cls, f"{key}.")
    lines.append("  trainer  where every stage runs (a stage's own trainer keys win), with the keys below")
    walk(TrainerSpec, "trainer.")
    lines.append("  stages (required)  list of stages, each with the keys below")
    walk(StageSpec, "stages[].")
    for key, cls in (("evaluation", EvalSpec), ("data", DataSpec)):
        walk(cls, f"{key}.")
    return "\n".join(lines)

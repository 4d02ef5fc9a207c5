"""Tools behind ``python -m src.cli <tool>`` that need no Trainer: ``params`` (accounting without weights)."""

from __future__ import annotations

import dataclasses
import json as jsonlib
from pathlib import Path
from typing import Any

import torch
import yaml
from diffusers import FluxTransformer2DModel
from jsonargparse import ActionConfigFile, ArgumentParser

from src.config_parsing import instantiate, user_facing_error
from src.dtypes import DTYPES
from src.errors import UserError
from src.models.accounting import count_params, flops_per_image, trajectory_cost
from src.models.compute_schedule import as_lists, check_fits, check_schedule
from src.models.dit_presets import MIB, PRESETS, PUBLISHED_ACTIVATED_MIB, params_table, preset_params
from src.models.flux_moe import dense_ffns
from src.models.loading import PROJECT_CONFIG_KEYS
from src.models.memory import StageSetup, format_plan, plan_stage
from src.models.mob import mob_groups
from src.models.moe import moe_layers
from src.models.presets import flux_config
from src.models.student import StudentRecipe, build_student, with_mob
from src.training.distill import trainable_parameters
from src.training.experiment import DataSpec, TeacherSpec, is_experiment_config, with_trainer_defaults
from src.training.precision import compute_dtype
from src.training.runner import run_experiment
from src.training.strategies import fsdp_spec


def _load_experiment(config: str) -> dict[str, Any]:
    """The experiment's arguments as run_experiment would receive them (dataclasses built and validated)."""
    if not Path(config).is_file():
        raise UserError(f"config {config}: no such file")
    if not is_experiment_config(config):
        raise UserError(
            f"config {config}: neither a Dense2MoE experiment (it has no 'stages') nor a DiTModule config; "
            "params needs one of them, or --preset"
        )
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile)  # a file may include a base: `config: base.yaml`
    parser.add_function_arguments(run_experiment, as_positional=False)
    try:
        cfg = parser.parse_path(config)
        args = vars(instantiate(parser, cfg))
        args.pop("config", None)
    except ValueError as err:  # a section typed `X | None` reports its own error as its cause
        raise UserError(f"config {config}: {user_facing_error(err) or err}") from None
    try:  # each stage's trainer section resolved over the experiment's, as Experiment holds them
        args["stages"] = with_trainer_defaults(args["stages"], args.get("trainer"))
    except UserError as err:
        raise UserError(f"config {config}: {err}") from None
    return args


def _teacher_config(teacher) -> dict[str, Any]:
    folder = Path(teacher.path) / (teacher.subfolder or "")
    if (folder / "config.json").is_file():
        raw = jsonlib.loads((folder / "config.json").read_text())
        # the structure only: keys this project adds (prediction_type, sampling_shift) are not constructor kwargs
        return {k: v for k, v in raw.items() if not k.startswith("_") and k not in PROJECT_CONFIG_KEYS}
    if teacher.preset:
        return flux_config(teacher.preset)
    raise UserError(f"teacher {teacher.path}: no local config.json and no teacher.preset to count parameters from")


def build_on_meta(args: dict[str, Any]) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Teacher and student of an experiment on the meta device: their structure, no weights, no memory."""
    spec = args["student"]
    with torch.device("meta"):
        teacher = FluxTransformer2DModel(**_teacher_config(args["teacher"]))
    if spec is None:
        return teacher, teacher
    conv = spec.conversion
    if conv is not None:  # structure only: which neurons go where does not change the counts
        conv = dataclasses.replace(conv, split="contiguous", assignment="contiguous", router_init="zeros")
    scores = {name: torch.arange(ffn.up.out_features, 0, -1.0) for name, ffn in dense_ffns(teacher).items()}
    recipe = StudentRecipe(conversion=conv, prune=spec.prune, mob=spec.mob)
    return teacher, build_student(teacher, recipe, scores=scores)


def params(
    config: str | None = None,
    json: bool = False,
    height: int | None = None,
    width: int | None = None,
    text_len: int | None = None,
    preset: str | None = None,
    memory: bool = False,
    gpus: int | None = None,
    stage: str | None = None,
    top_k_schedule: list[tuple[float, int]] | None = None,
    mob_active_schedule: list[tuple[float, int]] | None = None,
) -> dict[str, Any]:
    """Total and activated parameters per component, and FLOPs per image per step, of an experiment's teacher and
    student — counted on the meta device, so FLUX.1-dev needs no weights. With ``--preset`` (or a DiTModule
    config): a class-conditional DiT / DSMoE / JiTMoE in decimal units and in the recipe's 2^20 units.

    Args:
        config: An experiment YAML (with ``stages``), or a LightningCLI config of ``src.training.dit.DiTModule``.
        json: Print one JSON object (keys total, activated, activated_without_modulation, flops, teacher, …).
        height: Image height in pixels for FLOPs (default: the experiment's data.image_size).
        width: Image width in pixels (default: height).
        text_len: Text tokens for FLOPs (default 512 for FLUX-size teachers, 16 for the shapes world).
        preset: A DiT preset name (src.models.dit_presets, e.g. dsmoe-s-e16), or "all" for the recipe's table.
        memory: Print the per-GPU memory plan of every stage instead (src/models/memory.py; docs/scale.md).
        gpus: GPUs a stage runs on for --memory (default: the stage's devices); FSDP shards model state over them.
        stage: With --memory, plan only this stage.
        top_k_schedule: The student's top-k as a function of σ, [[σ_max, k], …] from σ_max = 1.0 down (default:
            the experiment's evaluation.top_k_schedule); adds activated params and FLOPs averaged over the
            sampler's steps (evaluation.steps, evaluation.shift).
        mob_active_schedule: The student's MoB κ as a function of σ, in the same form (default: the experiment's).
    """
    if preset is not None or (config is not None and _dit_module_args(config) is not None):
        return _dit_params(preset, config, json)
    if config is None:
        raise UserError("params needs --config (an experiment YAML or a DiTModule config) or --preset")
    args = _load_experiment(config)
    args["teacher"] = args.get("teacher") or TeacherSpec()
    args["data"] = args.get("data") or DataSpec()
    if memory:
        return memory_plan(args, height, width, text_len, gpus, stage, json)
    teacher, student = build_on_meta(args)
    size = height or args["data"].image_size
    w = width or size
    shapes_world = teacher.config.in_channels == 48
    if shapes_world:
        patch = int((teacher.config.in_channels // 3) ** 0.5)
        flop_args = {"image_tokens": (size // patch) * (w // patch), "text_len": text_len or 16}
    else:
        flop_args = {"height": size, "width": w, "text_len": text_len or 512}
    report: dict[str, Any] = {}
    for name, model in (("teacher", teacher), ("student", student)):
        counts = count_params(model)
        flops = flops_per_image(model, **flop_args)
        report[name] = {
            "total": counts["total"],
            "activated": counts["activated"],
            "activated_without_modulation": counts["activated_without_modulation"],
            "flops": flops["total"],
            "by_component": counts["by_component"],
        }
    out = {k: report["student"][k] for k in ("total", "activated", "activated_without_modulation", "flops")}
    out |= {"teacher": report["teacher"], "student": report["student"], "flops_at": flop_args}
    trajectory = _trajectory(args, student, top_k_schedule, mob_active_schedule, flop_args)
    if trajectory is not None:
        out["trajectory"] = trajectory
    if json:
        print(jsonlib.dumps(out, indent=1, default=int))
    else:
        print(_params_table(report, flop_args))
        if trajectory is not None:
            print(_trajectory_line(trajectory))
    return out


def _trajectory(args, student, top_k_schedule, mob_active_schedule, flop_args) -> dict[str, Any] | None:
    """The student's activated params and FLOPs averaged over the evaluation sampler's steps under the compute
    schedules (the flags, else the experiment's evaluation ones); None without any schedule."""
    ev = args.get("evaluation")
    try:
        schedules = [
            check_schedule(given if given is not None else getattr(ev, name, None), name)
            for given, name in ((top_k_schedule, "top_k_schedule"), (mob_active_schedule, "mob_active_schedule"))
        ]
        check_fits(student, *schedules)
    except ValueError as err:
        raise UserError(str(err)) from None
    if all(s is None for s in schedules):
        return None
    if schedules[0] is not None and not moe_layers(student):
        raise UserError("top_k_schedule: the student has no MoE layers to route")
    if schedules[1] is not None and not mob_groups(student):
        raise UserError("mob_active_schedule: the student has no MoB groups")
    steps = ev.steps if ev is not None else 20
    shift = (ev.shift if ev is not None else None) or _teacher_shift(args["teacher"]) or 1.0
    cost = trajectory_cost(student, steps, shift, *schedules, **flop_args)
    cost["top_k_schedule"], cost["mob_active_schedule"] = as_lists(schedules[0]), as_lists(schedules[1])
    return cost


def _teacher_shift(teacher) -> float | None:
    """The teacher's config ``sampling_shift`` (what the evaluation samples with when evaluation.shift is null)."""
    config = Path(teacher.path) / (teacher.subfolder or "") / "config.json"
    if not config.is_file():
        return None
    shift = jsonlib.loads(config.read_text()).get("sampling_shift")
    return float(shift) if isinstance(shift, (int, float)) else None


def _trajectory_line(t: dict[str, Any]) -> str:
    per_step = ", ".join(f"σ={r['sigma']:.3f}: k={r['top_k']} κ={r['mob_active']}" for r in t["per_step"])
    return (
        f"student averaged over {t['steps']} sampling steps (shift {t['shift']:g}; top_k_schedule "
        f"{t['top_k_schedule']}, mob_active_schedule {t['mob_active_schedule']}): activated {t['activated']:,.0f} "
        f"({t['activated_without_modulation']:,.0f} w/o AdaLN modulation), FLOPs / image / step "
        f"{t['flops']:.4g}\n  per step: {per_step}"
    )


def _params_table(report: dict[str, Any], flop_args: dict[str, Any]) -> str:
    def fmt(n: float) -> str:
        return f"{n / 1e9:.3f} B" if n >= 1e8 else f"{n / 1e6:.3f} M"

    lines = [
        "| component | teacher total | teacher activated | student total | student activated |",
        "|---|---:|---:|---:|---:|",
    ]
    comps = report["teacher"]["by_component"].keys() | report["student"]["by_component"].keys()
    for comp in sorted(comps):
        t = report["teacher"]["by_component"].get(comp, {"total": 0, "activated": 0})
        s = report["student"]["by_component"].get(comp, {"total": 0, "activated": 0})
        if t["total"] or s["total"]:
            lines.append(
                f"| {comp} | {fmt(t['total'])} | {fmt(t['activated'])} | {fmt(s['total'])} | {fmt(s['activated'])} |"
            )
    t, s = report["teacher"], report["student"]
    lines.append(f"| **all** | {t['total']:,} | {t['activated']:,} | {s['total']:,} | {s['activated']:,} |")
    lines.append(
        f"| activated w/o AdaLN modulation | | {t['activated_without_modulation']:,} | | {s['activated_without_modulation']:,} |"
    )
    lines.append(f"| FLOPs / image / step ({flop_args}) | | {t['flops']:.4g} | | {s['flops']:.4g} |")
    return "\n".join(lines)


def _dit_module_args(config: str) -> dict[str, Any] | None:
    """The ``model.init_args`` of a LightningCLI config whose model is the DiTModule, else None."""
    path = Path(config)
    if not path.is_file() or path.suffix not in (".yaml", ".yml"):
        return None
    model = (yaml.safe_load(path.read_text()) or {}).get("model")
    if not isinstance(model, dict) or not str(model.get("class_path", "")).endswith("DiTModule"):
        return None
    return model.get("init_args") or {}


def _dit_params(preset: str | None, config: str | None, json: bool) -> dict[str, Any]:
    """Counts of DiT presets (or of a DiTModule config's model) in decimal and 2^20 units."""
    overrides: dict[str, Any] = {}
    if preset is None:
        init = _dit_module_args(config)
        preset, overrides = init.get("preset", "dsmoe-s-e48-mini"), init.get("model") or {}
    names = list(PRESETS) if preset == "all" else [preset]
    unknown = [n for n in names if n not in PRESETS]
    if unknown:
        raise UserError(f"preset {unknown[0]!r}: allowed presets are all, {', '.join(PRESETS)}")
    try:
        counts = {name: preset_params(name, **overrides) for name in names}
    except ValueError as err:
        raise UserError(f"config {config}: {err}") from None
    out = {
        name: {
            "total": c["total"],
            "activated": c["activated"],
            "total_2^20": round(c["total"] / MIB, 2),
            "activated_2^20": round(c["activated"] / MIB, 2),
            **({"published_activated_2^20": PUBLISHED_ACTIVATED_MIB[name]} if name in PUBLISHED_ACTIVATED_MIB else {}),
        }
        for name, c in counts.items()
    }
    if json:
        print(jsonlib.dumps(out, indent=1))
    elif overrides:
        (name,) = names
        c = out[name]
        print(f"{config}: preset {name} with model overrides {overrides}")
        print(
            f"total {c['total']:,} ({c['total_2^20']} × 2^20), activated {c['activated']:,} ({c['activated_2^20']} × 2^20)"
        )
    else:
        print(params_table(names))
        print("2^20 units: the recipe (arXiv 2512.01252) quotes DSMoE/JiTMoE activated parameters in them.")
    return out


def _tokens(teacher_config: dict[str, Any], height: int, width: int) -> int:
    """Image tokens per sample; UserError for a resolution the model cannot take."""
    if teacher_config.get("in_channels") == 48:  # the shapes world: RGB patches of side p packed to 3·p² channels
        patch, what = int((teacher_config["in_channels"] // 3) ** 0.5), "the patch size"
    else:  # FLUX: the VAE downsamples 8×, latents are packed 2×2
        patch, what = 16, "16 (VAE factor 8 × 2×2 latent packing)"
    for name, value in (("height", height), ("width", width)):
        if value < patch or value % patch:
            raise UserError(f"{name}={value}: must be a positive multiple of {what}, i.e. of {patch}")
    return (height // patch) * (width // patch)


def memory_plan(
    args: dict[str, Any],
    height: int | None,
    width: int | None,
    text_len: int | None,
    gpus: int | None,
    stage: str | None,
    json: bool,
) -> dict[str, Any]:
    """``params --memory``: per-GPU memory of each stage (src/models/memory.py), from meta-device models."""
    stages = args["stages"]
    if stage is not None and stage not in [s.name for s in stages]:
        raise UserError(f"stage={stage!r}: not a stage of this experiment; allowed {[s.name for s in stages]}")
    if gpus is not None and gpus < 1:
        raise UserError(f"gpus={gpus}: must be >= 1")
    teacher_cfg = _teacher_config(args["teacher"])
    size = height or args["data"].image_size
    image_tokens = _tokens(teacher_cfg, size, width or size)
    text_tokens = text_len or (16 if teacher_cfg.get("in_channels") == 48 else 512)
    plans, settings = {}, {}
    for spec in stages:
        if stage is not None and spec.name != stage:
            continue
        teacher, student = build_on_meta(args)
        if spec.kind == "mob_kd":
            student = with_mob(student, args["student"].mob)
        trained = frozenset(
            n for n, p in student.named_parameters() if id(p) in _ids(trainable_parameters(student, spec))
        )
        strategy, devices = spec.trainer.strategy, spec.trainer.devices
        fsdp = fsdp_spec(strategy)
        init = strategy.get("init_args", {}) if isinstance(strategy, dict) else {}
        world = gpus or (devices if isinstance(devices, int) and devices > 0 else 1)
        setup = StageSetup(
            trained=trained,
            compute_dtype=compute_dtype(spec.precision),
            teacher_dtype=DTYPES[args["teacher"].dtype],
            batch_size=spec.batch_size,
            image_tokens=image_tokens,
            text_tokens=text_tokens,
            gpus=world,
            fsdp=fsdp,
            checkpointing=fsdp and bool(init.get("activation_checkpointing_policy")),
            top_k=0 if spec.kind == "shared_kd" else None,
            kind=spec.kind,
        )
        plans[spec.name] = plan_stage(teacher, student, setup)
        settings[spec.name] = {
            "kind": spec.kind,
            "trained params": f"{sum(p.numel() for n, p in student.named_parameters() if n in trained) / 1e9:.3f} B",
            "resolution": f"{size}x{width or size} ({image_tokens} image + {text_tokens} text tokens)",
            "batch per GPU": spec.batch_size,
            "precision": spec.precision,
            "GPUs / FSDP": f"{world} / {'sharded' if fsdp else 'no'}",
            "activation checkpointing": "blocks" if setup.checkpointing else "no",
        }
    if json:
        print(jsonlib.dumps({"memory": plans, "settings": settings}, indent=1, default=str))
    else:
        print(format_plan(plans, settings))
    return {"memory": plans, "settings": settings}


def _ids(params: list[torch.nn.Parameter]) -> set[int]:
    return {id(p) for p in params}

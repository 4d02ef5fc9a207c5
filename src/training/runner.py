"""Runs an ``Experiment``: builds the student, runs each stage as its own Trainer.fit, resumes, evaluates.

``run_experiment`` is what ``python -m src.cli fit`` calls for an experiment YAML (its arguments are the YAML's
keys, src/training/experiment.py defines them).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

import lightning as L
import mlflow
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from src.data.datamodule import ShapesDataModule
from src.data.latents import LatentDataModule
from src.data.prepare import config_class_name, is_flux_pipeline_class
from src.data.worlds import DEFAULT_WORLD, model_world
from src.dtypes import DTYPES
from src.errors import UserError, short_reason
from src.folders import check_writable_dir
from src.hub import is_hub_id
from src.models.convert import ConversionConfig
from src.models.flow import interpolate
from src.models.loading import load_transformer
from src.models.mob import group_spans, mob_groups
from src.models.moe import set_layers_top_k
from src.models.pipeline import SamplingConfig, ShapesPipeline
from src.models.prune import block_importance_mse
from src.models.student import StudentRecipe, build_student, with_mob
from src.models.taylor import load_scores, save_scores, taylor_scores
from src.progress import progress_bar
from src.training.accumulation import accumulate_datamodule
from src.training.callbacks import ExpertLoadCallback, StageProgressBar
from src.training.conditioning import LatentConditioning, ShapesConditioning, velocity
from src.training.describe import config_yaml, experiment_params, stage_params
from src.training.distill import DistillStage, StageSpec
from src.training.experiment import (
    DataSpec,
    EvalSpec,
    Experiment,
    StudentSpec,
    TaylorSpec,
    TeacherSpec,
    validate_order,
    validate_schedules,
)
from src.training.folder_lock import folder_lock
from src.training.mlflow_logging import (
    MLflowLogger,
    check_tracking_uri,
    experiment_id,
    git_commit,
    log_new_params,
    mark_interrupted_runs,
    resolve_tracking_uri,
    ui_run_link,
)
from src.training.precision import STUDENT_LOAD_DTYPE
from src.training.report import evaluate_experiment, evaluate_latents
from src.training.strategies import (
    build_strategy,
    full_student,
    has_fsdp_units,
    is_fsdp,
    is_main_rank,
    rank_barrier,
)
from src.training.terminal import quiet_lightning
from src.training.trainer_spec import TrainerSpec


def load_teacher(exp: Experiment) -> torch.nn.Module:
    """The dense teacher in ``teacher.dtype`` from a transformer folder, a FLUX pipeline folder (with
    ``subfolder: transformer``) or a hub id; diffusers builds it on the meta device, then assigns the weights."""
    spec = exp.teacher
    folder = teacher_folder(exp)
    teacher = load_transformer(folder, spec.expected or None, dtype=DTYPES[spec.dtype], low_cpu_mem_usage=True)
    return teacher.eval().requires_grad_(False)


def teacher_folder(exp: Experiment) -> Path:
    """The checked local folder of the teacher's transformer (a hub id is downloaded first)."""
    spec = exp.teacher
    root = Path(spec.path).expanduser()
    if not root.exists() and is_hub_id(spec.path):
        root = _hub_snapshot(spec.path, spec.subfolder)
    folder = root / spec.subfolder if spec.subfolder else root
    _check_teacher_folder(spec.path, root, folder)
    return folder


def _hub_snapshot(repo: str, subfolder: str | None) -> Path:
    """The local copy of a hub repository (the transformer subfolder only), downloading what is missing."""
    from huggingface_hub import snapshot_download  # looked up when called: tests replace it with an offline stub

    patterns = [f"{subfolder}/*", "model_index.json"] if subfolder else None
    try:
        return Path(snapshot_download(repo, allow_patterns=patterns))
    except Exception as exc:  # noqa: BLE001 - offline, gated, unknown repo: each its own type
        raise UserError(
            f"teacher.path {repo}: no local folder {Path(repo).expanduser().absolute()}, and as a hub id the hub "
            f"cannot provide it ({short_reason(exc)}); set teacher.path to a FluxTransformer2DModel folder (relative paths "
            "in a config file resolve against its folder or the project root) or to a hub id reachable from here"
        ) from None


def _check_teacher_folder(name: str, root: Path, folder: Path) -> None:
    """A missing folder or one holding another kind of model is named, with the file that says so."""
    if not root.is_dir():
        raise UserError(
            f"teacher.path {name}: no such folder (a FluxTransformer2DModel folder, a FLUX pipeline folder with "
            "teacher.subfolder: transformer, or a hub id)"
        )
    index = root / "model_index.json"
    if index.is_file() and not is_flux_pipeline_class(found := config_class_name(index)):
        raise UserError(f"teacher {index}: a {found!r}, not a FLUX pipeline")
    config = folder / "config.json"
    if not config.is_file():
        hint = "; set teacher.subfolder: transformer" if index.is_file() and folder == root else ""
        raise UserError(f"teacher {config}: missing (expected a diffusers FluxTransformer2DModel folder){hint}")
    if (found := config_class_name(config)) != "FluxTransformer2DModel":
        raise UserError(f"teacher {config}: a {found!r}; the teacher must be a dense FluxTransformer2DModel")


def _stream_data(exp: Experiment, batch_size: int, offset: int, teacher=None, verify: str = "none"):
    """The stage's training data; latent data is checked against the teacher's config (and its shards with
    ``verify``, which ``run`` does once for all stages)."""
    if exp.data.kind == "latents":
        d = exp.data
        return LatentDataModule(
            d.path,
            batch_size=batch_size,
            seed=d.seed + offset,
            num_workers=d.num_workers,
            teacher_config=teacher.config if teacher is not None else None,
            verify=verify,
            cache_dir=d.cache_dir,
        )
    return ShapesDataModule(
        image_size=exp.data.image_size,
        batch_size=batch_size,
        seed=exp.data.seed + offset,
        val_prompts_per_task=4,
        snap=exp.data.snap,
        cells=exp.data.cells,
        world=model_world(teacher) if teacher is not None else DEFAULT_WORLD,
    )


# --- the initial student ----------------------------------------------------------------------------------------
def _calibration_data(exp: Experiment, teacher: torch.nn.Module):
    """The raw batches Taylor calibration draws from: its own stream of the teacher's world, or the latent split."""
    data = _stream_data(exp, exp.taylor.batch_size, offset=7919, teacher=teacher)
    if exp.data.kind == "shapes":
        yield from (data.train_stream.batch(i) for i in range(exp.taylor.batches))
        return
    produced = 0
    while produced < exp.taylor.batches:  # a small dataset is cycled (one reshuffle per pass)
        for batch in data.train_dataloader():
            yield batch
            produced += 1
            if produced == exp.taylor.batches:
                return


def taylor_batches(exp: Experiment, conditioning, teacher: torch.nn.Module):
    """Calibration batches with noise levels spread evenly over (0, 1) (Taylor scores across timesteps)."""
    n = exp.taylor.batches
    for i, batch in enumerate(_calibration_data(exp, teacher)):
        gen = torch.Generator().manual_seed(exp.seed * 7 + i)
        inputs = conditioning.inputs(batch)
        x0 = inputs.x0_BLD
        sigma = ((torch.arange(x0.shape[0]) + torch.rand(x0.shape[0], generator=gen)) / x0.shape[0] + i / n) % 1.0
        noise = torch.randn(x0.shape, generator=gen)
        x_t = interpolate(x0, noise, sigma)
        uncond = conditioning.unconditional(x0.shape[0])
        if exp.taylor.loss == "flow":
            target = noise - x0
        elif uncond is None:  # a guidance-distilled teacher: its guided velocity is one call
            with torch.no_grad():
                target = velocity(teacher, x_t, sigma, inputs, conditioning.guidance).float()
        else:  # the teacher's classifier-free-guided velocity: what the student will be asked to reproduce
            with torch.no_grad():
                v_c = velocity(teacher, x_t, sigma, inputs, conditioning.guidance)
                empty = dataclasses.replace(inputs, tokens_BTE=uncond[0], pooled_BP=uncond[1])
                v_u = velocity(teacher, x_t, sigma, empty, conditioning.guidance)
                target = v_u + conditioning.pipeline.sampling.cfg_scale * (v_c - v_u)
        yield {"x_t": x_t, "sigma": sigma, "inputs": inputs, "target": target}


def _counted(batches, label: str, total: int):
    """``batches`` with a progress bar that advances as each one is consumed (src/models stays free of it)."""
    with progress_bar(label, total) as progress:
        task = progress.add_task(label, total=total)
        for batch in batches:
            yield batch
            progress.advance(task)


def initial_student(exp: Experiment, teacher: torch.nn.Module, conditioning) -> torch.nn.Module:
    spec = exp.student
    conv, prune = spec.conversion, spec.prune
    needs_scores = conv is not None and (conv.split == "taylor" or conv.assignment in ("interleave", "contiguous"))
    needs_scores = needs_scores or (prune is not None and prune.kind == "width")
    scores = None
    if needs_scores:
        path = exp.output_dir / "taylor_scores.safetensors"
        n = exp.taylor.batches
        if path.exists():
            scores = load_scores(path)
        else:

            def loss_fn(model, b):
                v = velocity(model, b["x_t"], b["sigma"], b["inputs"], conditioning.guidance)
                return torch.nn.functional.mse_loss(v.float(), b["target"])

            label = f"Taylor scores ({exp.taylor.loss} loss)"
            scores = taylor_scores(teacher, _counted(taylor_batches(exp, conditioning, teacher), label, n), loss_fn)
            if is_main_rank():  # every rank computes the same scores; one writes them, atomically
                save_scores(path.with_suffix(".partial"), scores)
                os.replace(path.with_suffix(".partial"), path)
    importance = None
    if prune is not None and prune.kind == "depth" and prune.rank == "mse":
        guided = getattr(teacher.config, "guidance_embeds", False)
        batches = [
            {
                "hidden_states": b["x_t"].to(teacher.dtype),
                "encoder_hidden_states": b["inputs"].tokens_BTE.to(teacher.dtype),
                "pooled_projections": b["inputs"].pooled_BP.to(teacher.dtype),
                "timestep": b["sigma"],
                "img_ids": b["inputs"].img_ids_L3,
                "txt_ids": b["inputs"].txt_ids_T3,
                "guidance": torch.full_like(b["sigma"], conditioning.guidance) if guided else None,
            }
            for b in taylor_batches(exp, conditioning, teacher)
        ]
        importance = block_importance_mse(teacher, batches)
    recipe = StudentRecipe(conversion=conv, prune=prune)
    return build_student(teacher, recipe, scores=scores, block_importance=importance)


# --- stages ---------------------------------------------------------------------------------------------------------
def _newest_checkpoint(folder: Path) -> tuple[Path, set[str]] | tuple[None, None]:
    """The newest checkpoint that loads, with its state-dict keys (a run killed while writing one leaves a
    truncated file behind)."""
    for path in sorted(folder.glob("*.ckpt"), key=lambda p: p.stat().st_mtime, reverse=True):
        try:
            saved = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
            return path, set(saved["state_dict"])
        except Exception:  # noqa: BLE001 - any unreadable file is skipped
            continue
    return None, None


def run_stage(
    exp: Experiment, index: int, teacher, student, conditioning, parent_run_id: str, params: dict[str, Any]
) -> torch.nn.Module:
    """One stage's ``Trainer.fit`` (resumed from its newest checkpoint) in its own MLflow run; ``params``: the
    parent run's, of which the stage run logs its share (src/training/describe.py)."""
    spec: StageSpec = exp.stages[index]
    stage_dir = exp.output_dir / spec.name
    ckpt_dir = stage_dir / "checkpoints"
    fp = exp.stage_fingerprint(index)
    meta = stage_dir / "stage.json"
    if meta.exists() and not exp.matches(index, json.loads(meta.read_text())["fingerprint"]):
        raise UserError(
            f"{stage_dir}: holds a stage {spec.name!r} started with a different configuration (e.g. another MoE "
            "layout); it is kept untouched — use a new output_dir or delete that folder"
        )
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    if is_main_rank():
        meta.write_text(json.dumps({"fingerprint": fp, "stage": spec.name}) + "\n")
    resume, keys = _newest_checkpoint(ckpt_dir)
    if resume is not None:
        wanted = {f"student.{k}" for k in student.state_dict()}
        if keys != wanted:
            raise UserError(
                f"checkpoint {resume}: its student does not match this stage's student (different MoE layout or "
                "blocks); it is kept untouched — use a new output_dir"
            )
    module = DistillStage(teacher, student, spec, conditioning, seed=exp.seed + 1009 * index)
    os.environ["DENSE2MOE_PARENT_RUN_ID"] = parent_run_id
    tags = {"stage": spec.name, "stage_kind": spec.kind, "experiment": exp.name, "kind": "stage"}
    if is_main_rank() and parent_run_id:
        client = mlflow.MlflowClient(tracking_uri=resolve_tracking_uri(exp.tracking_uri))
        killed = mark_interrupted_runs(client, experiment_id(client, exp.experiment_name), parent_run_id, spec.name)
        if killed:
            tags["resumed_from"] = ",".join(killed)
    logger = MLflowLogger(
        experiment_name=exp.experiment_name,
        run_name=f"{exp.name}/{spec.name}",
        tracking_uri=exp.tracking_uri,
        tags=tags,
    )
    run_on = spec.trainer  # resolved over the experiment's section (Experiment holds the stages so)
    checkpoint = ModelCheckpoint(
        dirpath=ckpt_dir,
        filename="step{step:06d}",
        auto_insert_metric_name=False,
        every_n_train_steps=run_on.checkpoint_every,
        save_top_k=1,
        save_last=True,
    )
    trainer_args = dict(
        max_steps=spec.steps,
        accelerator=run_on.accelerator,
        devices=run_on.devices,
        strategy=build_strategy(run_on.strategy, spec.kind),
        num_nodes=run_on.nodes(),
        precision=spec.precision,
        gradient_clip_val=spec.gradient_clip_val,
        accumulate_grad_batches=spec.accumulate_grad_batches,
        logger=logger,
        callbacks=[checkpoint, ExpertLoadCallback(), StageProgressBar(f"{exp.name}/{spec.name}"), *exp.callbacks],
        limit_val_batches=0,
        num_sanity_val_steps=0,
        log_every_n_steps=min(10, spec.steps),
        enable_model_summary=False,
    )
    quiet_lightning()
    # trainer.extra holds only arguments the runner does not set, or its overridable defaults (trainer_spec.py)
    trainer = L.Trainer(**(trainer_args | run_on.extra))
    if trainer.world_size != run_on.world_size():  # the fingerprint's global batch counted another world size
        raise UserError(
            f"stage {spec.name!r}: Lightning runs {trainer.world_size} processes, but trainer.devices="
            f"{run_on.devices!r} × {run_on.nodes()} node(s) counts {run_on.world_size()}; set trainer.devices to a "
            "number or a list of device ids"
        )
    if is_main_rank() and params:
        log_new_params(logger.experiment, logger.run_id, stage_params(params))
        logger.experiment.log_text(logger.run_id, config_yaml(exp), "config.yaml")
    # the stream yields each optimizer step's whole per-device batch; MicroBatches hands it out in slices
    parts = spec.accumulate_grad_batches
    data = _stream_data(exp, spec.batch_size * parts, offset=104729 * (index + 1), teacher=teacher)
    data = accumulate_datamodule(data, parts)
    trainer.fit(module, datamodule=data, ckpt_path=str(resume) if resume else None)
    if trainer.interrupted:
        raise KeyboardInterrupt
    if is_fsdp(trainer.strategy):  # the trained weights are sharded over the ranks: gather them
        student = full_student(trainer, student)
    if spec.kind == "shared_kd":
        set_layers_top_k(student, module.top_k)
    return student


def run(exp: Experiment, only_stage: str | None) -> dict[str, Any]:
    check_writable_dir(str(exp.output_dir), "output_dir")
    uri = resolve_tracking_uri(exp.tracking_uri)
    check_tracking_uri(uri)
    teacher = load_teacher(exp)
    if exp.student.mob is not None:
        try:  # refuse MoB groups that don't fit the teacher before any stage runs
            group_spans(exp.student.mob, len(teacher.transformer_blocks), len(teacher.single_transformer_blocks))
        except ValueError as err:
            raise UserError(f"student.mob: {err}") from None
    sampling = SamplingConfig(
        steps=exp.evaluation.steps,
        cfg_scale=exp.evaluation.cfg_scale,
        shift=exp.evaluation.shift,
        guidance=exp.teacher.guidance,
    )
    if exp.data.kind == "latents":
        # refuse data that does not fit the teacher, damaged shards or too few samples before any stage runs
        _stream_data(exp, max(s.batch_size for s in exp.stages), 0, teacher, verify=exp.data.verify)
        conditioning = LatentConditioning(exp.teacher.guidance)
    else:
        conditioning = ShapesConditioning(ShapesPipeline(teacher, image_size=exp.data.image_size, sampling=sampling))
    exp.output_dir.mkdir(parents=True, exist_ok=True)  # only now: bad input above leaves no folder behind
    # data-parallel ranks share rank 0's folder; a second command into it is refused
    with folder_lock(exp.output_dir, "output_dir") if is_main_rank() else contextlib.nullcontext():
        check_stage_folders(exp, only_stage)  # a refused rerun touches no MLflow run
        return _run_stages(exp, only_stage, teacher, conditioning, uri)


def check_stage_folders(exp: Experiment, only_stage: str | None) -> None:
    """Stage folders from another configuration, or an ``only_stage`` whose predecessors are unfinished."""
    for index, spec in enumerate(exp.stages):
        stage_dir = exp.output_dir / spec.name
        for marker in ("done.json", "stage.json"):
            path = stage_dir / marker
            if path.exists() and not exp.matches(index, json.loads(path.read_text())["fingerprint"]):
                state = "finished" if marker == "done.json" else "started"
                raise UserError(
                    f"{stage_dir}: {state} with a different configuration (e.g. another MoE layout or stage "
                    "order); it is kept untouched — use a new output_dir"
                )
        if only_stage == spec.name:
            return
        if only_stage is not None and not (stage_dir / "done.json").exists():
            raise UserError(f"only_stage={only_stage!r}: stage {spec.name!r} before it is not finished yet")


def _run_stages(exp: Experiment, only_stage: str | None, teacher, conditioning, uri: str) -> dict[str, Any]:
    parent, params = "", {}
    if is_main_rank():
        parent = _parent_run(exp, uri)
        params = experiment_params(exp, teacher, teacher_folder(exp))
        client = mlflow.MlflowClient(tracking_uri=uri)
        log_new_params(client, parent, params)
        client.log_text(parent, config_yaml(exp), "config.yaml")
    started = time.perf_counter()
    student_dir: Path | None = None
    try:
        for index, spec in enumerate(exp.stages):
            stage_dir = exp.output_dir / spec.name
            done = stage_dir / "done.json"
            if done.exists():
                if not exp.matches(index, json.loads(done.read_text())["fingerprint"]):
                    raise UserError(
                        f"{stage_dir}: finished with a different configuration (e.g. another MoE layout or stage "
                        "order); it is kept untouched — use a new output_dir"
                    )
                print(f"stage {spec.name}: finished earlier, skipped ({stage_dir / 'student'})")
                student_dir = stage_dir / "student"
                continue
            if only_stage is not None and spec.name != only_stage:
                raise UserError(f"only_stage={only_stage!r}: stage {spec.name!r} before it is not finished yet")
            if student_dir is None:
                try:
                    student = initial_student(exp, teacher, conditioning)
                except ValueError as err:  # conversion / pruning settings that don't fit this teacher
                    raise UserError(f"student: {err}") from None
            else:  # the stage's precision policy casts it further (src/training/precision.py)
                student = load_transformer(student_dir, torch_dtype=STUDENT_LOAD_DTYPE)
            if spec.kind == "mob_kd" and not mob_groups(student):
                student = with_mob(student, exp.student.mob)
            student = run_stage(exp, index, teacher, student, conditioning, parent, params)
            if has_fsdp_units(teacher):  # FSDP sharded the teacher's blocks in place: a whole one for what follows
                teacher = load_teacher(exp)
                if conditioning.pipeline is not None:
                    conditioning.pipeline.transformer = teacher
            if is_main_rank():  # data-parallel ranks hold the same student: one writes it, all read it next
                student.save_pretrained(stage_dir / "student")
                done.write_text(json.dumps({"fingerprint": exp.stage_fingerprint(index), "stage": spec.name}) + "\n")
            rank_barrier()
            student_dir = stage_dir / "student"
            if only_stage == spec.name:
                print(f"stage {spec.name}: done ({student_dir})")
                return {"student": str(student_dir)}
    except BaseException:
        if parent:
            _finish_parent(uri, parent, "FAILED")
        raise
    result: dict[str, Any] = {"student": str(student_dir)}
    if not is_main_rank():  # the evaluation and the parent MLflow run belong to rank 0
        return result
    if exp.evaluation.enabled:  # evaluated in the teacher's dtype, as the teacher is
        student = load_transformer(student_dir, torch_dtype=DTYPES[exp.teacher.dtype])
        if exp.data.kind == "latents":
            result |= evaluate_latents(exp, teacher, student, conditioning, uri, parent)
        else:
            result |= evaluate_experiment(exp, teacher, student, conditioning.pipeline, uri, parent)
    _finish_parent(uri, parent, "FINISHED", time.perf_counter() - started)
    print(f"MLflow: experiment {exp.experiment_name!r}, parent run {parent} with one nested run per stage ({uri})")
    print(f"  view it: mlflow ui --backend-store-uri {uri}")
    print(
        f"  then open {ui_run_link(mlflow.MlflowClient(tracking_uri=uri).get_run(parent).info.experiment_id, parent)}"
    )
    return result


def _parent_run(exp: Experiment, uri: str) -> str:
    """The experiment's parent MLflow run: reused when the same output folder is resumed."""
    state_file = exp.output_dir / "experiment.json"
    client = mlflow.MlflowClient(tracking_uri=uri)
    if state_file.exists():
        run_id = json.loads(state_file.read_text())["parent_run_id"]
        try:
            client.get_run(run_id)
            client.update_run(run_id, status="RUNNING")
            if exp.mlflow_parent_run_id:
                client.set_tag(run_id, "mlflow.parentRunId", exp.mlflow_parent_run_id)
            return run_id
        except mlflow.exceptions.MlflowException:
            pass
    exp_id = experiment_id(client, exp.experiment_name)
    tags = {"experiment": exp.name, "kind": "dense2moe"}
    if exp.mlflow_parent_run_id:  # a sweep trial's run
        tags["mlflow.parentRunId"] = exp.mlflow_parent_run_id
    if git_commit():
        tags["mlflow.source.git.commit"] = git_commit()
    run = client.create_run(exp_id, run_name=exp.name, tags=tags)
    state_file.write_text(json.dumps({"parent_run_id": run.info.run_id, "name": exp.name}) + "\n")
    return run.info.run_id


def _finish_parent(uri: str, run_id: str, status: str, seconds: float | None = None) -> None:
    client = mlflow.MlflowClient(tracking_uri=uri)
    if seconds is not None:
        client.log_metric(run_id, "time/fit_seconds", seconds)
    client.set_terminated(run_id, status)


def run_experiment(
    name: str,
    stages: list[StageSpec],
    teacher: TeacherSpec | None = None,
    student: StudentSpec | None = None,
    taylor: TaylorSpec | None = None,
    evaluation: EvalSpec | None = None,
    data: DataSpec | None = None,
    trainer: TrainerSpec | None = None,
    output_dir: str | None = None,
    seed: int = 0,
    experiment_name: str = "dense2moe",
    tracking_uri: str | None = None,
    only_stage: str | None = None,
    threads: int | None = None,
    callbacks: list[Callback] | None = None,
    mlflow_parent_run_id: str | None = None,
) -> dict[str, Any]:
    """Run a Dense2MoE experiment: its stages in order, then the teacher-vs-student evaluation.

    Args:
        name: Experiment name (parent MLflow run name; default output folder runs/<name>).
        stages: The distillation stages, in order.
        teacher: The dense teacher.
        student: How the student is made (conversion, MoB, pruning).
        taylor: Taylor-score calibration.
        evaluation: The evaluation at the end.
        data: Training data (the shapes world, or prepare-data latents).
        trainer: Where the stages run (accelerator, devices, num_nodes, strategy, checkpoint_every, extra
            lightning.Trainer arguments); defaults for every stage's own ``trainer`` section, whose keys win.
        output_dir: Where stages, checkpoints and the report go (default runs/<name>).
        seed: Seed of every stage's noise and timesteps.
        experiment_name: MLflow experiment.
        tracking_uri: MLflow tracking URI (default: MLFLOW_TRACKING_URI or sqlite:///mlflow.db).
        only_stage: Run just this stage (its predecessors must be finished) and skip the evaluation.
        threads: torch CPU threads.
        callbacks: Extra Lightning callbacks for every stage (the sweep driver's pruning callback).
        mlflow_parent_run_id: Nest the experiment's parent MLflow run under this run (a sweep trial's run).
    """
    if threads:
        torch.set_num_threads(threads)
    student = student or StudentSpec(conversion=ConversionConfig())
    validate_order(stages, student)
    validate_schedules(evaluation, student, data)
    if only_stage is not None and only_stage not in [s.name for s in stages]:
        raise UserError(f"only_stage={only_stage!r}: not one of {[s.name for s in stages]}")
    trainer = trainer or TrainerSpec()
    exp = Experiment(
        name=name,
        teacher=teacher or TeacherSpec(),
        student=student,
        stages=stages,
        taylor=taylor or TaylorSpec(),
        evaluation=evaluation or EvalSpec(),
        data=data or DataSpec(),
        output_dir=Path(output_dir or os.path.join("runs", name)),
        seed=seed,
        experiment_name=experiment_name,
        tracking_uri=tracking_uri,
        callbacks=list(callbacks or []),
        mlflow_parent_run_id=mlflow_parent_run_id,
        trainer=trainer,
    )
    return run(exp, only_stage)

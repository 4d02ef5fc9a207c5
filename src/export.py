"""``python -m src.cli export --ckpt ... --out DIR``: a trained student as a diffusers model folder with a model card.

DIR gets ``config.json`` + ``diffusion_pytorch_model.safetensors`` (``save_pretrained``; loads with
``FluxMoETransformer2DModel.from_pretrained(DIR)`` and drops into ``FluxPipeline(transformer=...)``) and a
``README.md`` model card: Hugging Face front matter, the expert layout, MoB groups, total and activated parameters
with and without the AdaLN modulation (src/models/accounting.py, docs/design.md §2.9), and the evaluation of the run when
the exported student is the one that run evaluated.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from diffusers import FluxTransformer2DModel
from torch import nn

from evaluation.provenance import format_provenance
from src.atomic import replaced_folder
from src.errors import UserError
from src.folders import check_writable_dir
from src.models.accounting import count_params
from src.models.compute_schedule import SCHEDULE_KEYS, as_lists, check_fits, check_schedule, describe, model_schedules
from src.models.flux_moe import build_from_state, moe_summary, set_top_k
from src.models.loading import load_transformer
from src.models.mob import mob_groups
from src.models.moe import moe_layers
from src.models.presets import flux_config

FLUX_DEV_ID = "black-forest-labs/FLUX.1-dev"
_CARD_TAGS = ("text-to-image", "diffusers", "flux", "mixture-of-experts", "dense2moe", "distillation")


def export(
    ckpt: str,
    out: str,
    base_model: str | None = None,
    top_k: int | None = None,
    top_k_schedule: list[tuple[float, int]] | None = None,
    mob_active_schedule: list[tuple[float, int]] | None = None,
) -> dict[str, Any]:
    """Write a trained student as a diffusers model folder (config + safetensors) with a README.md model card.

    Args:
        ckpt: A student folder (a stage's ``student/``, a ``save_pretrained`` output), a stage folder, a Lightning
            ``.ckpt`` of a stage, or an experiment output folder (its last finished stage's student and, when it
            was evaluated, its report/summary.json).
        out: The folder to create; it must not exist or be empty.
        base_model: Hub id or path of the pipeline the student belongs to, for the model card (default:
            black-forest-labs/FLUX.1-dev when the architecture is FLUX.1-dev's, else none).
        top_k: Routed experts per token stored in the exported config (default: the trained value).
        top_k_schedule: Top-k as a function of σ stored in the exported config (key ``sampling_schedule``), which
            the project's sampler and ``evaluate`` follow by default: [[σ_max, k], …] from σ_max = 1.0 down, e.g.
            [[1.0, 2], [0.5, 1]] (k = 2 for σ > 0.5, else 1).
        mob_active_schedule: MoB active blocks κ as a function of σ, stored the same way.
    """
    out_dir = Path(out)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UserError(f"out {out}: exists and is not an empty folder; it is kept untouched — choose a new folder")
    check_writable_dir(out, "out")
    student, source, summary = load_student(ckpt)
    if top_k is not None:
        try:
            set_top_k(student, top_k)
        except ValueError as err:
            raise UserError(f"top_k: {err}") from None
    if top_k_schedule is not None or mob_active_schedule is not None:
        store_schedules(student, top_k_schedule, mob_active_schedule)
    base = base_model or _default_base(student)
    try:  # a full disk or a kill leaves no half-written export
        with replaced_folder(out_dir) as partial:
            student.save_pretrained(partial)
            (partial / "README.md").write_text(model_card(student, base, source, summary))
    except OSError as err:
        raise UserError(
            f"out {out}: writing the export failed ({err.strerror or err}); nothing was left there"
        ) from None
    params = count_params(student)
    print(f"exported {source} → {out_dir} (config.json, diffusion_pytorch_model.safetensors, README.md)")
    print(
        f"  params total {params['total']:,}, activated {params['activated']:,} "
        f"({params['activated_without_modulation']:,} without AdaLN modulation)"
    )
    return {"out": str(out_dir), "source": source, "params": params, "evaluation": summary}


def store_schedules(student: nn.Module, top_k_schedule, mob_active_schedule) -> None:
    """Check the compute schedules against the student and keep them in its config (``sampling_schedule``)."""
    given = {"top_k_schedule": top_k_schedule, "mob_active_schedule": mob_active_schedule}
    try:
        checked = {name: check_schedule(value, name) for name, value in given.items()}
        check_fits(student, checked["top_k_schedule"], checked["mob_active_schedule"])
    except ValueError as err:
        raise UserError(str(err)) from None
    if checked["top_k_schedule"] is not None and not moe_layers(student):
        raise UserError("top_k_schedule: the student has no MoE layers to route")
    if checked["mob_active_schedule"] is not None and not mob_groups(student):
        raise UserError("mob_active_schedule: the student has no MoB groups")
    stored = {key: as_lists(checked[field]) for key, field in SCHEDULE_KEYS.items() if checked[field] is not None}
    student.register_to_config(sampling_schedule=stored)


# --- reading what --ckpt points at ---------------------------------------------------------------------------------
def load_student(ckpt: str) -> tuple[nn.Module, str, dict[str, Any] | None]:
    """(student, the student folder or checkpoint it came from, the run's evaluation summary or None)."""
    path = Path(ckpt)
    if not path.exists():
        raise UserError(f"ckpt {ckpt}: no such file or folder")
    if path.is_file():
        if path.suffix != ".ckpt":
            raise UserError(f"ckpt {ckpt}: not a Lightning .ckpt, a student folder or an experiment folder")
        return _from_lightning_ckpt(path), str(path), None
    if (path / "config.json").is_file():
        return _from_folder(path), str(path), _summary_for(path)
    if (path / "student" / "config.json").is_file():
        return _from_folder(path / "student"), str(path / "student"), _summary_for(path / "student")
    finished = sorted(path.glob("*/done.json"), key=lambda p: (p.stat().st_mtime, p.parent.name))
    finished = [p for p in finished if (p.parent / "student" / "config.json").is_file()]
    if not finished:
        raise UserError(
            f"ckpt {ckpt}: holds no diffusers config.json, no student/ folder and no finished stage "
            "(expected a student folder, a stage folder, a .ckpt or an experiment output folder)"
        )
    folder = finished[-1].parent / "student"
    return _from_folder(folder), str(folder), _summary_for(folder)


def _from_folder(folder: Path) -> nn.Module:
    return load_transformer(folder)


def _summary_for(student_dir: Path) -> dict[str, Any] | None:
    """The run's report/summary.json if it evaluated this student: the last stage finished, then the report."""
    stage_dir = student_dir.parent
    exp_dir = stage_dir.parent
    summary = exp_dir / "report" / "summary.json"
    done = stage_dir / "done.json"
    if not (summary.is_file() and done.is_file()):
        return None
    last = max(exp_dir.glob("*/done.json"), key=lambda p: p.stat().st_mtime)
    if last != done or summary.stat().st_mtime < done.stat().st_mtime:
        return None
    try:
        data = json.loads(summary.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"evaluation summary {summary}: not valid JSON ({exc.msg})") from None
    return data if isinstance(data, dict) else None


def _from_lightning_ckpt(path: Path) -> nn.Module:
    try:
        saved = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is one error line
        raise UserError(f"ckpt {path}: cannot be read as a Lightning checkpoint ({type(exc).__name__})") from None
    state = saved.get("state_dict") if isinstance(saved, dict) else None
    if not isinstance(state, dict):
        raise UserError(f"ckpt {path}: has no state_dict (not a Lightning checkpoint)")
    state = {k.removeprefix("student."): v for k, v in state.items() if k.startswith("student.")}
    if not state:
        raise UserError(f"ckpt {path}: holds no student weights (not a distillation stage checkpoint)")
    spec = saved.get("student_config")
    if spec is None:  # checkpoints written before the config was stored: the finished stage's student folder
        config_file = path.parent.parent / "student" / "config.json"
        if not config_file.is_file():
            raise UserError(
                f"ckpt {path}: stores no student config and {config_file} does not exist; export the stage's "
                "student/ folder instead"
            )
        raw = json.loads(config_file.read_text())
        spec = {"class_name": raw.get("_class_name"), "config": raw}
    return _build(spec["class_name"], spec["config"], state, path)


def _build(class_name: str, config: dict[str, Any], state: dict[str, torch.Tensor], where: Path) -> nn.Module:
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    try:
        if class_name == "FluxMoETransformer2DModel":
            return build_from_state(config, state, "cpu").eval()
        if class_name == "FluxTransformer2DModel":
            with torch.device("meta"):
                model = FluxTransformer2DModel.from_config(config)
            model.load_state_dict(state, strict=True, assign=True)
            return model.eval()
    except (RuntimeError, TypeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"ckpt {where}: its student weights do not fit its config ({first})") from None
    raise UserError(
        f"ckpt {where}: student class {class_name!r} is not FluxMoETransformer2DModel or FluxTransformer2DModel"
    )


# --- the model card ---------------------------------------------------------------------------------------------------
def _default_base(model: nn.Module) -> str | None:
    config = dict(model.config)
    dev = flux_config("flux-dev")
    same = all(
        _plain(config.get(k)) == _plain(v) for k, v in dev.items() if k not in ("num_layers", "num_single_layers")
    )
    # a depth-pruned student has fewer blocks; its kept_* lists index FLUX.1-dev's 19 + 38
    return FLUX_DEV_ID if same else None


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _front_matter(base: str | None) -> str:
    lines = ["---", "library_name: diffusers", "pipeline_tag: text-to-image"]
    if base:
        lines.append(f"base_model: {base}")
    if base == FLUX_DEV_ID:  # a derivative of FLUX.1-dev's weights carries its licence
        lines += ["license: other", "license_name: flux-1-dev-non-commercial-license"]
    lines.append("tags:")
    lines += [f"  - {tag}" for tag in _CARD_TAGS]
    return "\n".join(lines + ["---", ""])


def _layout_rows(model: nn.Module) -> list[tuple[str, str]]:
    s = moe_summary(model)
    rows = [("class", type(model).__name__), ("blocks", f"{s['num_double']} double-stream + {s['num_single']} single")]
    if s["num_moe_layers"]:
        rows += [
            ("expert layout", f"{s['layout']} (S shared, E routed experts, top-K)"),
            ("MoE locations", ", ".join(s["moe_locations"] or [])),
            ("MoE layers", str(s["num_moe_layers"])),
            ("shared / routed expert width", f"{s['shared_width']} / {s['expert_width']}"),
        ]
    mob = s["mob"]
    if mob:
        groups = mob_groups(model)
        rows.append(
            (
                "MoB groups",
                f"{len(groups)} groups of m={mob['group_size']} {mob['stream']}-stream blocks, "
                f"κ={mob['active']} active per sample ({mob['selection']})",
            )
        )
    for field, schedule in model_schedules(model).items():
        if schedule is not None:
            what = "top-k" if field == "top_k_schedule" else "MoB κ"
            rows.append((f"sampling {what} by noise level σ", describe(schedule)))
    if s["ffn_widths"]:
        rows.append(("width-pruned FFNs", f"{len(s['ffn_widths'])} narrowed"))
    if s["kept_double"] is not None or s["kept_single"] is not None:
        rows.append(("depth-pruned: kept blocks", f"double {s['kept_double']}, single {s['kept_single']}"))
    return rows


def _evaluation_rows(summary: dict[str, Any]) -> list[str]:
    """Metrics as teacher | student rows: "teacher/x" ~ "student/x", "x/teacher" ~ "x/student", "x/teacher_y" ~
    "x/student_y"; a plain key that repeats a paired student value under a short name (e.g. "flops") is dropped."""
    paired: dict[str, dict[str, float]] = {}
    single: dict[str, float] = {}
    for key, value in summary.items():
        if not isinstance(value, int | float) or isinstance(value, bool):
            continue
        who = next((w for w in ("teacher", "student") if w in key.split("/") or f"/{w}_" in key), None)
        if who is None:
            single[key] = value
            continue
        name = key.replace(f"{who}/", "").replace(f"/{who}_", "/").removesuffix(f"/{who}")
        paired.setdefault(name, {})[who] = value
    lines = ["| metric | teacher | student |", "|---|---:|---:|"]
    for name in sorted(paired):
        lines.append(f"| {name} | {_num(paired[name].get('teacher'))} | {_num(paired[name].get('student'))} |")
    lines += [f"| {name} | – | {_num(v)} |" for name, v in sorted(single.items()) if name not in paired]
    return lines


def _num(value: float | None) -> str:
    if value is None:
        return "–"
    if isinstance(value, int) or float(value).is_integer() and abs(value) >= 1000:
        return f"{int(value):,}"
    return f"{value:.4g}"


def _protocol_lines(summary: dict[str, Any]) -> list[str]:
    """The GenEval protocol behind the card's GenEval numbers (evaluation/provenance.py), or a note that it is unknown."""
    if "provenance" in summary:
        return ["GenEval protocol (comparable only with numbers of the same protocol):", "",
                *format_provenance(summary["provenance"]), ""]  # fmt: skip
    if any("geneval" in key for key in summary):
        return ["GenEval protocol: unknown (this report predates provenance records).", ""]
    return []


def model_card(model: nn.Module, base: str | None, source: str, summary: dict[str, Any] | None) -> str:
    """README.md text: HF front matter, layout, parameter accounting, evaluation, usage."""
    params = count_params(model)
    name = f"{base.split('/')[-1]}-MoE" if base else "Dense2MoE student"
    lines = [_front_matter(base), f"# {name}", ""]
    lines += [
        "A Mixture-of-Experts student distilled from a dense FLUX-architecture transformer with Dense2MoE "
        "(ICCV 2025, arXiv 2510.09094): the FFNs became shared + routed experts, optionally "
        "with Mixture of Blocks groups.",
        "",
        f"Exported from `{source}`" + (f"; base pipeline `{base}`." if base else "."),
        "",
        "## Layout",
        "",
        "| | |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v} |" for k, v in _layout_rows(model)]
    lines += [
        "",
        "## Parameters",
        "",
        "Activated = used by one sample at one denoising step (shared experts, routers, top-k routed experts, κ of m "
        "blocks per MoB group). Dense2MoE's published activated counts leave out the per-block AdaLN modulation.",
        "",
        "| | count |",
        "|---|---:|",
        f"| total | {params['total']:,} |",
        f"| activated | {params['activated']:,} |",
        f"| activated without AdaLN modulation | {params['activated_without_modulation']:,} |",
        "",
    ]
    lines += ["## Evaluation", ""]
    if summary:
        lines += ["From the run's end-of-fit report (`report/summary.json`):", "", *_evaluation_rows(summary), ""]
        lines += _protocol_lines(summary)
    else:
        lines += ["No evaluation of this exact student was found next to it.", ""]
    pipeline_id = base or "<FluxPipeline folder or hub id>"
    lines += [
        "## Usage",
        "",
        "```python",
        "import torch",
        "from diffusers import FluxPipeline",
        "from src.models.flux_moe import FluxMoETransformer2DModel, set_top_k",
        "",
        'transformer = FluxMoETransformer2DModel.from_pretrained("<this folder>", torch_dtype=torch.bfloat16)',
        f'pipe = FluxPipeline.from_pretrained("{pipeline_id}", transformer=transformer, torch_dtype=torch.bfloat16)',
        'image = pipe("a red cube left of a blue ball", num_inference_steps=28).images[0]',
        "set_top_k(pipe.transformer, 1)  # fewer routed experts per token at inference, no retraining",
        "```",
        "",
        "The model class lives in the dense2moe repository (`src/models/flux_moe.py`).",
        "",
    ]
    if model.config.get("sampling_schedule"):
        lines += [
            "The config's `sampling_schedule` (top-k / κ by noise level, see Layout) is followed by the repository's "
            "sampler and `evaluate` (src/models/compute_schedule.py); diffusers' FluxPipeline samples at the "
            "config's fixed top-k.",
            "",
        ]
    return "\n".join(lines)

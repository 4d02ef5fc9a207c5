"""Load a transformer from a diffusers folder (``save_pretrained`` output), with one clear error when it can't be.

The class comes from the folder's ``config.json`` (``_class_name``): the dense ``FluxTransformer2DModel`` or the
project's ``FluxMoETransformer2DModel``. ``expected`` config entries are checked, so a checkpoint that does not match
the experiment's config is refused before anything is trained or overwritten.
"""

from __future__ import annotations

import ast
import contextlib
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from diffusers import FluxTransformer2DModel
from safetensors import safe_open
from torch import nn

from src.errors import UserError
from src.models.flux_moe import FluxMoETransformer2DModel

KNOWN_CLASSES = ("FluxTransformer2DModel", "FluxMoETransformer2DModel")
PROJECT_CONFIG_KEYS = ("prediction_type", "sampling_shift", "sampling_schedule", "world")


def _model_class(name: str) -> type:
    if name == "FluxTransformer2DModel":
        return FluxTransformer2DModel
    return FluxMoETransformer2DModel


def load_transformer(path: str | Path, expected: dict[str, Any] | None = None, **kwargs: Any) -> nn.Module:
    folder = Path(path)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise UserError(f"checkpoint {path}: no diffusers config.json there (expected a save_pretrained folder)")
    try:
        class_name = json.loads(config_file.read_text()).get("_class_name")
    except json.JSONDecodeError as exc:
        raise UserError(f"checkpoint {config_file}: not valid JSON ({exc.msg})") from None
    if class_name not in KNOWN_CLASSES:
        raise UserError(f"checkpoint {path}: model class {class_name!r} is not one of {', '.join(KNOWN_CLASSES)}")
    try:
        with _quiet_extra_config_keys():
            model = _model_class(class_name).from_pretrained(folder, **kwargs)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as exc:
        text = str(exc).strip()
        first = text.splitlines()[0] if text else type(exc).__name__
        raise UserError(f"checkpoint {path} cannot be loaded: {first}") from None
    _check_weights_match_config(folder, model)
    if expected:
        wrong = {
            k: (model.config[k], v)
            for k, v in expected.items()
            if k in model.config and _norm(model.config[k]) != _norm(v)
        }
        if wrong:
            parts = ", ".join(f"{k}={got!r} (config says {want!r})" for k, (got, want) in wrong.items())
            raise UserError(f"checkpoint {path} does not match the config: {parts}")
    return model


def _check_weights_match_config(folder: Path, model: nn.Module) -> None:
    """config.json and the weights must describe the same model: diffusers leaves tensors the weights lack on the
    meta device and drops weights the config has no place for."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return
    saved: set[str] = set()
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            saved.update(handle.keys())
    wanted = set(model.state_dict())
    if saved == wanted:
        return
    counts = []
    for key, prefix in (("num_layers", "transformer_blocks."), ("num_single_layers", "single_transformer_blocks.")):
        in_weights = len({k.split(".")[1] for k in saved if k.startswith(prefix)})
        if key in model.config and in_weights != model.config[key]:
            counts.append(f"{key}={model.config[key]} but the weights hold {in_weights} blocks")
    detail = "; ".join(counts) or f"e.g. {sorted(saved ^ wanted)[0]!r} is in only one of them"
    raise UserError(f"checkpoint {folder}: config.json does not match the weights ({detail})")


@contextlib.contextmanager
def _quiet_extra_config_keys() -> Iterator[None]:
    """Hide diffusers' "config attributes ... will be ignored" warning for keys this project adds on purpose.

    A dense teacher trained with x-prediction carries ``prediction_type`` in its config.json; diffusers keeps the
    key in ``model.config`` (which is where it is read) but warns that the class does not take it.
    """
    logger = logging.getLogger("diffusers.configuration_utils")

    def keep(record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not ("were passed to" in message and all(k in PROJECT_CONFIG_KEYS for k in _quoted_keys(message)))

    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


def _quoted_keys(message: str) -> list[str]:
    start, end = message.find("{"), message.rfind("}")
    if start < 0:
        return []
    try:  # the top-level keys only: a value may be a dict of its own (``sampling_schedule``)
        return [str(key) for key in ast.literal_eval(message[start : end + 1])]
    except (ValueError, SyntaxError):
        return re.findall(r"'([^']+)':", message[start : end + 1])


def _norm(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value

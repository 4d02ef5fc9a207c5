"""Config files on the command line: read with one clear error line, and their relative paths made location-free.

Rule for relative paths written *inside* a config file (``teacher.path: checkpoints/teacher_tiny``): they resolve
against the config file's own folder when something exists there, else against the project root — the nearest
folder at or above the config file that holds ``pyproject.toml`` — else against the config file's folder again.
So ``dense2moe fit --config /abs/repo/experiments/debug.yaml`` means the same from any working directory, and a
config of your own next to your own teacher folder works as written. Paths given on the command line, and the
defaults (``runs/<name>``, ``sqlite:///mlflow.db``), stay relative to the working directory. URLs (``s3://…``) and
names that are no local path anywhere (a hub id such as ``black-forest-labs/FLUX.1-dev``) are left as written.

A config file may include another (``config: base/flux_dev.yaml``, jsonargparse's include, relative to the including
file); a path keeps the folder of the file that wrote it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from src.errors import UserError

EXPERIMENT_PATHS = ("teacher.path", "output_dir", "data.path", "data.cache_dir", "evaluation.teacher_cache")
"""Keys of an experiment YAML that hold local paths."""
HUB_KEYS = ("teacher.path",)
"""Of those, the keys that may also name a hub repository ("org/name")."""


def read_config(path: str | Path) -> dict[str, Any]:
    """A YAML config file as a mapping; UserError naming the file (and line:column of a syntax error)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--config {path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"--config {path}: not UTF-8 text (byte {err.start}); expected a YAML file") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise UserError(f"{where}: YAML syntax error: {problem}") from None
    if data is None:
        raise UserError(f"--config {path}: the file is empty; expected a mapping of config keys (key: value)")
    if not isinstance(data, dict):
        raise UserError(f"--config {path}: the top level is a {type(data).__name__}; expected a mapping (key: value)")
    return data


def check_config_args(argv: list[str]) -> None:
    """Every ``--config FILE`` of a command line reads as a YAML mapping (inline YAML strings are left alone)."""
    for value in config_args(argv):
        if "\n" in value or value.lstrip().startswith("{"):
            continue  # jsonargparse also takes the config's text itself
        read_config(value)


def config_args(argv: list[str]) -> list[str]:
    values = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a in ("--config", "-c")]
    return values + [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]


def project_root(start: Path) -> Path | None:
    """The nearest folder at or above ``start`` holding ``pyproject.toml``."""
    for folder in (start, *start.parents):
        if (folder / "pyproject.toml").is_file():
            return folder
    return None


def resolve_in_config(value: str, config_file: Path, may_be_hub_id: bool = False) -> str:
    """A path written in ``config_file``, made absolute by the rule at the top of this file (an "org/name" found
    nowhere stays as written when ``may_be_hub_id``)."""
    if "://" in value or value.startswith("~") or Path(value).is_absolute():
        return value
    here = config_file.resolve().parent
    root = project_root(here)
    candidates = [here / value] + ([root / value] if root is not None else [])
    for candidate in candidates:
        if candidate.exists():
            return str(candidate)
    if may_be_hub_id and value.count("/") == 1 and not value.startswith("."):
        return value
    return str(candidates[-1])


def path_sources(argv: list[str], keys: tuple[str, ...]) -> dict[str, Path]:
    """For each of ``keys``, the config file that set it last (absent when the command line set it later)."""
    sources: dict[str, Path] = {}
    for i, arg in enumerate(argv):
        if arg in ("--config", "-c") or arg.startswith("--config="):
            value = arg.split("=", 1)[1] if "=" in arg else (argv[i + 1] if i + 1 < len(argv) else "")
            if not Path(value).is_file():
                continue
            sources.update(_file_sources(Path(value), keys))
        elif arg.startswith("--"):
            name = arg[2:].split("=", 1)[0]
            for key in keys:
                if key == name or key.startswith(name + "."):
                    sources.pop(key, None)
    return sources


def include_chain(path: Path, seen: tuple[Path, ...] = ()) -> list[tuple[Path, dict[str, Any]]]:
    """A config file and what it includes (``config: base.yaml`` or a list, jsonargparse's include, relative to the
    including file), in the order their keys apply: included files first, the file itself last."""
    if path.resolve() in seen:
        raise UserError(f"--config {path}: includes itself (config: chain {' → '.join(str(p) for p in seen)})")
    data = read_config(path)
    included = data.get("config")
    chain: list[tuple[Path, dict[str, Any]]] = []
    for name in [included] if isinstance(included, str) else included if isinstance(included, list) else []:
        base = Path(name) if Path(name).is_absolute() else path.parent / name
        chain += include_chain(base, (*seen, path.resolve()))
    return [*chain, (path, data)]


def _file_sources(path: Path, keys: tuple[str, ...]) -> dict[str, Path]:
    """The ``keys`` a config file sets, with what it includes, and the file that set each last."""
    return {key: file for file, data in include_chain(path) for key in keys if _has(data, key.split("."))}


def _has(data: Any, segments: list[str]) -> bool:
    for seg in segments:
        if not isinstance(data, dict) or seg not in data:
            return False
        data = data[seg]
    return isinstance(data, str)


def resolve_config_paths(cfg: Any, argv: list[str], keys: tuple[str, ...]) -> None:
    """Rewrite, in a parsed jsonargparse namespace, the ``keys`` that came from a config file (rule above)."""
    for key, config_file in path_sources(argv, keys).items():
        value = cfg.get(key)
        if isinstance(value, str) and value:
            cfg[key] = resolve_in_config(value, config_file, may_be_hub_id=key in HUB_KEYS)

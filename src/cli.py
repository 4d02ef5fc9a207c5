"""Command line: ``python -m src.cli <command> --config <file.yaml> [--key.path value ...]``.

``fit``/``validate``/``test``/``predict`` are LightningCLI (a model, a datamodule, a Trainer). The tools below
(params, evaluate, sweep, export, prepare-data, compare, lora) are plain functions behind jsonargparse: they don't build
a Trainer (or a model) when they don't need one, and a sweep driver never re-executes itself under DDP.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from typing import Any

from jsonargparse import ActionConfigFile, ArgumentError, ArgumentParser, set_parsing_settings
from lightning.pytorch.cli import LightningCLI

from src.config_files import EXPERIMENT_PATHS, check_config_args, resolve_config_paths
from src.config_parsing import config_error_line, instantiate, root_cause, user_facing_error
from src.cpu_allocator import keep_large_allocations
from src.errors import UserError
from src.threads import default_threads
from src.training.experiment import is_experiment_config, yaml_keys
from src.training.mlflow_logging import MLflowLogger, MLflowSaveConfigCallback, ui_run_link
from src.training.runner import run_experiment
from src.training.terminal import quiet_lightning

# name → "module:function"; each function's signature and docstring are its command line and --help.
TOOLS: dict[str, str] = {
    "params": "src.commands:params",
    "evaluate": "evaluation.evaluate:evaluate",
    "compare": "evaluation.compare:compare",
    "export": "src.export:export",
    "sweep": "src.sweep.driver:sweep",
    "prepare-data": "src.data.prepare:prepare_data",
    "lora": "src.lora_tool:lora",
}

TRAINER_COMMANDS = ("fit", "validate", "test", "predict")
TRAINER_HELP = {
    "fit": "Train: an experiment YAML (with `stages`) runs a Dense2MoE experiment, any other config a LightningCLI fit.",
    "validate": "LightningCLI: run a model's validation loop once.",
    "test": "LightningCLI: run a model's test loop once.",
    "predict": "LightningCLI: run a model's predict loop.",
}
HELP_FLAGS = ("-h", "--help")


def _overview() -> str:
    """``python -m src.cli --help``: every command with the first sentence of its docstring."""
    lines = ["usage: python -m src.cli <command> [--config FILE.yaml] [--key.path value ...]", "", "commands:"]
    summaries = dict(TRAINER_HELP)
    for name, target in TOOLS.items():
        module, func = target.split(":")
        doc = " ".join((getattr(importlib.import_module(module), func).__doc__ or "").split("\n\n")[0].split())
        summaries[name] = doc.split(". ")[0].rstrip(".") + "."
    width = max(map(len, summaries))
    lines += [f"  {name:<{width}}  {text}" for name, text in summaries.items()]
    lines += [
        "",
        "`python -m src.cli <command> --help` lists a command's flags (`fit --help`: the experiment YAML's keys).",
    ]
    return "\n".join(lines)


def _fit_help() -> None:
    """``fit --help`` (or with an experiment config): the experiment's flags and every key of its YAML."""
    try:
        _run_function(run_experiment, ["--help"], prog="fit")
    except SystemExit:
        print(yaml_keys())
        print("\nA config without `stages` (e.g. experiments/teacher_tiny.yaml) is a LightningCLI fit:")
        print("  python -m src.cli fit --config experiments/teacher_tiny.yaml --help")
        raise


def _lightning_cli(args: list[str] | None) -> None:
    class Dense2MoECLI(LightningCLI):
        def after_fit(self) -> None:
            for logger in self.trainer.loggers:
                if isinstance(logger, MLflowLogger):
                    print(f"MLflow run: {logger.run_url}")
                    print(f"  view it: mlflow ui --backend-store-uri {logger._tracking_uri}")
                    print(f"  then open {ui_run_link(logger.experiment_id, logger.run_id)}")

    Dense2MoECLI(
        model_class=None,
        datamodule_class=None,
        save_config_callback=MLflowSaveConfigCallback,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={"logger": {"class_path": "src.training.mlflow_logging.MLflowLogger"}},
        auto_configure_optimizers=False,
        parser_kwargs={"exit_on_error": False, **{c: {"exit_on_error": False} for c in TRAINER_COMMANDS}},
        args=args,
    )


def _experiment_config(argv: list[str]) -> bool:
    """``fit --config X.yaml`` where X declares ``stages``: a multi-stage Dense2MoE experiment, not LightningCLI."""
    return any(is_experiment_config(c) for c in _configs(argv))


def _configs(argv: list[str]) -> list[str]:
    configs = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a in ("--config", "-c")]
    return configs + [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]


def _run_function(fn: Any, args: list[str], paths: tuple[str, ...] = (), prog: str | None = None) -> Any:
    """Parse ``args`` into ``fn``'s signature (``--config`` files, dot overrides) and call it.

    ``paths``: keys whose relative values, when a config file set them, resolve against that file
    (src/config_files.py). Building the config objects runs their validation, so a ValueError there is bad input,
    reported as one line.
    """
    parser = ArgumentParser(prog=f"python -m src.cli {prog or getattr(fn, '__name__', '')}", exit_on_error=False)
    if "config" not in inspect.signature(fn).parameters:  # e.g. `params --config X` names the experiment itself
        parser.add_argument("--config", "-c", action=ActionConfigFile, help="YAML file with any of the arguments below")
    parser.add_function_arguments(fn, as_positional=False)
    flags = {f"--{n}" for n, p in inspect.signature(fn).parameters.items() if p.annotation in (bool, "bool")}
    args = [a for i, arg in enumerate(args) for a in _bare_flag(arg, args[i + 1 : i + 2], flags)]
    cfg = parser.parse_args(args)
    resolve_config_paths(cfg, args, paths)
    try:
        init = instantiate(parser, cfg)
    except ValueError as err:
        raise UserError(f"invalid configuration: {root_cause(err)}") from None
    kwargs = {k: v for k, v in vars(init).items() if k != "config" or "config" in inspect.signature(fn).parameters}
    return fn(**kwargs)


def _bare_flag(arg: str, following: list[str], flags: set[str]) -> list[str]:
    """``--json`` alone means ``--json true`` for boolean tool options."""
    if arg in flags and (not following or following[0].startswith("--")):
        return [arg, "true"]
    return [arg]


def _run_tool(name: str, args: list[str]) -> Any:
    module, func = TOOLS[name].split(":")
    return _run_function(getattr(importlib.import_module(module), func), args, prog=name)


def main(argv: list[str] | None = None) -> None:
    # Config dataclasses document each field in a string literal below it: show those in --help.
    set_parsing_settings(docstring_parse_attribute_docstrings=True)

    own_process = argv is None  # not a caller's main([...]): process-wide CPU settings are ours to make
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv else None
    quiet_lightning()  # before any command can create an MLflow store (its creation narrates itself at INFO)
    try:
        check_config_args(argv[1:])
        if own_process and command is not None and command not in HELP_FLAGS and not set(HELP_FLAGS) & set(argv):
            keep_large_allocations()
            note = default_threads(argv)
            if note and sys.stderr.isatty():  # a terminal's user sees why; logs and captured output stay as they were
                print(note, file=sys.stderr)
        if command is None or command in HELP_FLAGS:
            print(_overview())
        elif command == "fit" and set(HELP_FLAGS) & set(argv) and (_experiment_config(argv) or not _configs(argv)):
            _fit_help()
        elif command in TOOLS:
            _run_tool(command, argv[1:])
        elif command == "fit" and _experiment_config(argv):
            _run_function(run_experiment, argv[1:], EXPERIMENT_PATHS, prog="fit")
        elif command in TRAINER_COMMANDS or command.startswith("-"):
            _lightning_cli(argv if argv != sys.argv[1:] else None)
        else:
            known = ", ".join([*TRAINER_COMMANDS, *TOOLS])
            raise UserError(f"unknown command {command!r}; allowed: {known}")
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except ArgumentError as exc:
        print(f"error: invalid configuration: {config_error_line(exc)}", file=sys.stderr)
        raise SystemExit(2) from None
    except Exception as exc:
        message = user_facing_error(exc)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()

"""Command line: ``python -m src.cli <command> --config <file.yaml> [--key.path value ...]``.

``fit``/``validate``/``test``/``predict`` are LightningCLI (a model, a datamodule, a Trainer). The tools below
(params, evaluate, sweep, export, prepare-data, compare) are plain functions behind jsonargparse: they don't build
a Trainer (or a model) when they don't need one, and a sweep driver never re-executes itself under DDP.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

from src.errors import UserError

# name → "module:function"; each function's signature and docstring are its command line and --help.
TOOLS: dict[str, str] = {}

TRAINER_COMMANDS = ("fit", "validate", "test", "predict")


def _lightning_cli(args: list[str]) -> None:
    from lightning.pytorch.cli import LightningCLI

    from src.training.mlflow_logging import MLflowLogger, MLflowSaveConfigCallback

    class Dense2MoECLI(LightningCLI):
        def after_fit(self) -> None:
            for logger in self.trainer.loggers:
                if isinstance(logger, MLflowLogger):
                    print(f"MLflow run: {logger.run_url}")
                    print(f"  view it: mlflow ui --backend-store-uri {logger._tracking_uri}")

    Dense2MoECLI(
        model_class=None,
        datamodule_class=None,
        save_config_callback=MLflowSaveConfigCallback,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={"logger": {"class_path": "src.training.mlflow_logging.MLflowLogger"}},
        auto_configure_optimizers=False,
        args=args,
    )


def _run_tool(name: str, args: list[str]) -> Any:
    from jsonargparse import auto_cli

    module, func = TOOLS[name].split(":")
    return auto_cli(getattr(importlib.import_module(module), func), args=args, as_positional=False)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv else None
    try:
        if command in TOOLS:
            _run_tool(command, argv[1:])
        elif command in TRAINER_COMMANDS or command is None or command.startswith("-"):
            _lightning_cli(argv)
        else:
            known = ", ".join([*TRAINER_COMMANDS, *TOOLS])
            raise UserError(f"unknown command {command!r}; allowed: {known}")
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()

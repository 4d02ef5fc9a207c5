"""Pruning at trainer.global_step, failure reasons, the trial budget, and the end-of-study tables and plots
(in-process, no trial subprocess)."""

import signal

import lightning as L
import optuna
import pytest
import torch
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState, create_trial

from src.errors import UserError
from src.sweep.pruning import OptunaStepPruning
from src.sweep.report import best_trials, plots, tables
from src.sweep.spec import ObjectiveSpec, ParamSpec, SamplerSpec, SweepSpec
from src.sweep.study import counts
from src.sweep.trial import failure, objective_values


class Scripted(L.LightningModule):
    """Logs a scripted ``train/loss`` per step; ``spec.name`` is the stage name, as on DistillStage."""

    def __init__(self, losses: list[float], stage: str = "s1") -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.losses = losses
        self.spec = type("Spec", (), {"name": stage})()

    def training_step(self, batch, batch_idx):
        self.log("train/loss", self.losses[self.global_step])
        return (self.w * batch[0]).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.ones(64, 1)), batch_size=1)


def fit(module: L.LightningModule, callback: OptunaStepPruning, steps: int) -> None:
    trainer = L.Trainer(
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback],
    )
    trainer.fit(module)


@pytest.fixture
def storage(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'optuna.db'}"


def callback(storage: str, number: int, **kwargs) -> OptunaStepPruning:
    options = {"n_startup_trials": 1, "n_warmup_steps": 0}
    return OptunaStepPruning(storage, "s", number, every_n_steps=2, pruner_options=options, **kwargs)


def test_reports_at_global_step_and_prunes_a_worse_trial(storage):
    study = optuna.create_study(study_name="s", storage=storage, pruner=optuna.pruners.MedianPruner(1, 0))
    first = study.ask()
    fit(Scripted([1.0] * 6, stage="s2"), callback(storage, first.number, stage_offsets={"s2": 10}), 6)
    study.tell(first, 1.0)
    assert study.trials[0].intermediate_values == {12: 1.0, 14: 1.0, 16: 1.0}  # offset 10 + steps 2, 4, 6

    second = study.ask()
    with pytest.raises(optuna.TrialPruned):
        fit(Scripted([5.0] * 6, stage="s2"), callback(storage, second.number, stage_offsets={"s2": 10}), 6)
    attrs = study.trials[1].user_attrs
    assert attrs == {"pruned_at_step": 12, "pruned_value": 5.0}  # stopped at the first report
    assert study.trials[1].intermediate_values == {12: 5.0}


def test_a_loss_is_negated_when_the_study_maximises(storage):
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    trial = study.ask()
    fit(Scripted([0.5, 0.25, 0.75, 2.0]), callback(storage, trial.number, sign=-1.0), 4)
    assert study.trials[0].intermediate_values == {2: -0.25, 4: -2.0}


def test_a_monitor_the_stage_does_not_log_is_an_error(storage):
    study = optuna.create_study(study_name="s", storage=storage)
    trial = study.ask()
    with pytest.raises(UserError, match="train/loss_out.*not logged.*train/loss"):
        fit(Scripted([1.0] * 4), callback(storage, trial.number, monitor="train/loss_out"), 4)


@pytest.mark.parametrize(
    ("log", "code", "kind", "reason"),
    [
        ("...\nerror: stage 's1': loss is nan at step 3; the last good checkpoint is kept\n", 2, "nan", "loss is nan"),
        ("Traceback...\ntorch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2 GiB\n", 1, "oom", "CUDA out"),
        ("step 10\n", -signal.SIGKILL, "oom", "killed by SIGKILL"),
        ("error: student: layout='1S5E2A': cannot split FFN width 64\n", 2, "error", "cannot split"),
        ("Traceback (most recent call last):\n  File x\nRuntimeError: boom\n", 1, "crash", "RuntimeError: boom"),
        ("", 3, "crash", "exit code 3"),
    ],
)
def test_failure_reasons(log, code, kind, reason):
    got_kind, got_reason = failure(log, code)
    assert got_kind == kind and reason in got_reason


def test_objective_values_name_missing_and_non_finite_metrics():
    assert objective_values({"a": 1.0, "b": 2.0}, ["b", "a"], "x") == ([2.0, 1.0], None, [])
    values, problem, missing = objective_values({"a": 1.0}, ["a", "c"], "x")
    assert values is None and missing == ["c"] and "['c'] not logged" in problem
    values, problem, missing = objective_values({"a": float("nan")}, ["a"], "x")
    assert values is None and not missing and "not finite" in problem


def _trial(state, value=None, **attrs):
    return create_trial(
        state=state,
        value=value,
        params={"layout": "1S4E1A" if value is None or value < 2 else "1S8E2A"},
        distributions={"layout": CategoricalDistribution(["1S4E1A", "1S8E2A"])},
        user_attrs=attrs,
    )


def test_budget_counts_what_ran_not_interrupted_or_skipped_trials():
    assert counts(_trial(TrialState.COMPLETE, 1.0))
    assert counts(_trial(TrialState.FAIL, fail_reason="cannot split"))
    assert counts(_trial(TrialState.PRUNED))
    assert not counts(_trial(TrialState.FAIL, interrupted=True))
    assert not counts(_trial(TrialState.FAIL, skipped=True))
    assert not counts(_trial(TrialState.WAITING))


def _spec(objectives: list[ObjectiveSpec] | None = None) -> SweepSpec:
    return SweepSpec(
        name="t",
        base="experiments/debug.yaml",
        objectives=objectives or [ObjectiveSpec("geneval_shapes/overall", "maximize")],
        space=[ParamSpec("layout", choices=["1S4E1A", "1S8E2A"])],
        sampler=SamplerSpec(name="random"),
        trials=4,
    )


def test_tables_rank_completed_trials_and_list_failures(tmp_path):
    study = optuna.create_study(direction="maximize")
    for t in (
        _trial(TrialState.COMPLETE, 1.0, seconds=60.0),
        _trial(TrialState.COMPLETE, 3.0, seconds=120.0),
        _trial(TrialState.FAIL, fail_reason="cannot split FFN width 64"),
        _trial(TrialState.PRUNED, fail_reason="pruned at step 10"),
        _trial(TrialState.FAIL, skipped=True),
    ):
        study.add_trial(t)
    spec = _spec()
    assert [t.number for t in best_trials(study, spec)] == [1, 0]
    text = tables(study, spec)
    best, everything = text.split("## All trials")
    assert best.index("| 1 | 1S8E2A | 3 |") < best.index("| 0 | 1S4E1A | 1 |")
    assert (
        "| 2 | FAIL | 1S4E1A |  |" in everything and "cannot split" in everything and "pruned at step 10" in everything
    )
    assert "| 4 |" not in everything  # skipped: never ran
    files, notes = plots(study, spec, tmp_path)
    assert {f.name for f in files} == {"optimization_history.png", "param_importances.png"} and not notes
    assert all(f.stat().st_size > 1000 for f in files)


def test_pareto_front_plot_and_no_importances_with_one_completed_trial(tmp_path):
    study = optuna.create_study(directions=["maximize", "minimize"])
    study.add_trial(
        create_trial(
            state=TrialState.COMPLETE,
            values=[0.5, 10.0],
            params={"layout": "1S4E1A"},
            distributions={"layout": CategoricalDistribution(["1S4E1A", "1S8E2A"])},
        )
    )
    spec = _spec(objectives=[ObjectiveSpec("a", "maximize"), ObjectiveSpec("b", "minimize")])
    files, notes = plots(study, spec, tmp_path)
    assert "pareto_front.png" in {f.name for f in files}
    assert any("importances" in n for n in notes)

"""``python -m src.cli sweep --config sweeps/<name>.yaml``: an Optuna study whose trials are experiments.

Each worker (``--workers N`` threads here; the same command on another machine joins through a shared storage)
asks the study for a trial, writes the trial's config to ``<output_dir>/trial_NNNN/config.yaml``, runs ``fit`` on
it as a subprocess, reads the objectives (``report/summary.json`` of a Dense2MoE experiment, the MLflow metrics of
a LightningCLI fit) and tells the study. The budget (``trials``) counts every trial that ran, failed ones included,
and is exact across workers: asking is serialised on this machine, and a trial that another machine's worker
pushed over the budget is recorded as skipped (it never runs).

Robustness: a crash, OOM or NaN in a trial is a FAIL with its reason (Optuna user attribute ``fail_reason``, MLflow
tag ``sweep.fail_reason``) and the study goes on. Ctrl-C (or SIGTERM) interrupts the running trials, records them
as failed ("interrupted") with a retry queued, and exits 130. A worker that died (killed, machine lost) is found
by its stopped heartbeat — at once when it ran on this machine — and its trial is failed and retried. Rerunning
the same command resumes: finished trials are kept, interrupted ones are re-run, the remaining budget runs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.trial import FrozenTrial, TrialState
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from src.errors import UserError
from src.folders import check_writable_dir
from src.sweep import checks, configs, report
from src.sweep.spec import SweepSpec, load_sweep
from src.sweep.storage import dashboard_command, default_storage, local_lock, normalize, pid_alive
from src.sweep.study import counts, open_study
from src.sweep.tracking import Tracker
from src.sweep.trial import Outcome, child_env, failure, fit_command, objective_values, read_report, run_fit
from src.training.mlflow_logging import check_tracking_uri, resolve_tracking_uri

POLL_S = 2.0
"""Seconds between looks at the storage while waiting for other workers' trials."""


class Driver:
    """The workers of this process on one study."""

    def __init__(
        self, spec: SweepSpec, study: optuna.Study, url: str, out: Path, tracker: Tracker, parent: str, workers: int
    ) -> None:
        self.spec, self.study, self.url, self.out = spec, study, url, out
        self.tracker, self.parent, self.workers = tracker, parent, workers
        self.n_trials = spec.n_trials
        self.deadline = time.monotonic() + spec.timeout if spec.timeout else None
        self.stop = threading.Event()
        self.active: set[int] = set()
        self.host, self.pid = socket.gethostname(), os.getpid()
        self.threads_per_trial = max(1, (os.cpu_count() or 1) // workers)
        self.errors: list[BaseException] = []
        self.console = Console()
        storage = study._storage
        self._study_id = storage.get_study_id_from_name(spec.name)

    # --- the study's state ------------------------------------------------------------------------------------
    def trials(self) -> list[FrozenTrial]:
        return self.study.get_trials(deepcopy=False)

    def _trial_id(self, number: int) -> int:
        return self.study._storage.get_trial_id_from_study_id_trial_number(self._study_id, number)

    def frozen(self, number: int) -> FrozenTrial:
        return self.study._storage.get_trial(self._trial_id(number))

    def budget_left(self, trials: list[FrozenTrial]) -> bool:
        if self.deadline is not None and time.monotonic() > self.deadline:
            return False
        return self.n_trials is None or sum(map(counts, trials)) < self.n_trials

    def finished(self) -> bool:
        """Nothing runs and nothing more will: the budget is used up, or the timeout has passed."""
        trials = self.trials()
        if any(t.state == TrialState.RUNNING for t in trials):
            return False
        timed_out = self.deadline is not None and time.monotonic() > self.deadline
        return timed_out or (self.n_trials is not None and sum(map(counts, trials)) >= self.n_trials)

    def say(self, message: str) -> None:
        self.console.print(message, highlight=False, markup=False, soft_wrap=True)

    # --- dead workers -------------------------------------------------------------------------------------------
    def stale_reason(self, t: FrozenTrial) -> str | None:
        attrs, now = t.user_attrs, time.time()
        host, pid, beat = attrs.get("worker_host"), attrs.get("worker_pid"), attrs.get("heartbeat")
        if host == self.host and pid is not None and (pid == self.pid or not pid_alive(pid)):
            return f"interrupted: its worker ({host}, pid {pid}) is gone"
        if beat is not None and now - beat > self.spec.grace_period:
            return f"interrupted: no heartbeat from its worker ({host}, pid {pid}) for {now - beat:.0f} s"
        if beat is None and t.datetime_start and now - t.datetime_start.timestamp() > self.spec.grace_period:
            return "interrupted: its worker never started it"
        return None

    def recover_stale(self) -> None:
        """Fail (and queue again) trials left RUNNING by dead workers; called under the local lock."""
        for t in self.trials():
            if t.state != TrialState.RUNNING or t.number in self.active:
                continue
            reason = self.stale_reason(t)
            if reason is None:
                continue
            self._kill_orphan(t)
            if self._fail(t.number, "interrupted", reason, retry=True):
                self.say(f"trial {t.number}: {reason}; marked FAIL and queued again")
                if t.user_attrs.get("mlflow_run_id"):
                    self.tracker.finish_trial(t.user_attrs["mlflow_run_id"], "FAIL", {}, reason)

    def _kill_orphan(self, t: FrozenTrial) -> None:
        """The fit process of a trial whose driver died on this machine (recognised by its command line)."""
        pid, trial_dir = t.user_attrs.get("child_pid"), t.user_attrs.get("trial_dir")
        if t.user_attrs.get("worker_host") != self.host or not pid or not trial_dir or not pid_alive(pid):
            return
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            return
        if trial_dir in cmdline:
            try:
                os.killpg(pid, signal.SIGKILL)  # its own session: the group id is its pid
            except (ProcessLookupError, PermissionError):
                pass

    def _fail(self, number: int, kind: str, reason: str, retry: bool = False) -> bool:
        """Record a FAIL with its reason (and queue the same parameters again when ``retry``); False if the trial
        had finished already (another worker got there first)."""
        storage, trial_id = self.study._storage, self._trial_id(number)
        try:
            storage.set_trial_user_attr(trial_id, "fail_kind", kind)
            storage.set_trial_user_attr(trial_id, "fail_reason", reason)
            if retry:
                storage.set_trial_user_attr(trial_id, "interrupted", True)
            self.study.tell(number, state=TrialState.FAIL)
        except (RuntimeError, ValueError):  # finished meanwhile (UpdateFinishedTrialError is a RuntimeError)
            return False
        params = self.frozen(number).params
        if retry and all(p.path in params for p in self.spec.params):
            self.study.enqueue_trial(params, user_attrs={"retry_of": number})
        return True

    # --- workers ------------------------------------------------------------------------------------------------
    def next_trial(self) -> optuna.trial.Trial | None:
        """A new (or retried) trial for this worker, or None when the budget is used up and nothing else runs."""
        trial = None
        while trial is None:
            if self.stop.is_set():
                return None
            with local_lock(self.out):
                self.recover_stale()
                trials = self.trials()
                if self.budget_left(trials):
                    trial = self.study.ask()
                    self.active.add(trial.number)
                    self._mark_running(trial.number)
                    break
            if self.deadline is not None and time.monotonic() > self.deadline:
                return None
            if not any(t.state == TrialState.RUNNING and t.number not in self.active for t in trials):
                return None
            self.stop.wait(POLL_S)  # other workers' trials may still fail and be queued again
        before = sum(1 for t in self.trials() if t.number < trial.number and counts(t))
        if self.n_trials is not None and before >= self.n_trials:  # another machine's worker took the last slot
            trial.set_user_attr("skipped", True)
            self.study.tell(trial, state=TrialState.FAIL)
            self.active.discard(trial.number)
            return None
        return trial

    def _mark_running(self, number: int) -> None:
        storage, trial_id = self.study._storage, self._trial_id(number)
        for key, value in (("worker_host", self.host), ("worker_pid", self.pid), ("heartbeat", time.time())):
            storage.set_trial_user_attr(trial_id, key, value)

    def worker(self, done: threading.Event) -> None:
        """Trials until the budget is used up; an error of the driver itself fails the trial and stops the study."""
        try:
            while not self.stop.is_set():
                trial = self.next_trial()
                if trial is None:
                    return
                try:
                    self.run_trial(trial)
                except BaseException as err:
                    self._fail(trial.number, "driver", f"sweep driver error: {type(err).__name__}: {err}", retry=True)
                    raise
                finally:
                    self.active.discard(trial.number)
        except BaseException as err:  # noqa: BLE001 - re-raised by the main thread
            self.errors.append(err)
            self.stop.set()
        finally:
            done.set()

    def run_trial(self, trial: optuna.trial.Trial) -> None:
        number, spec = trial.number, self.spec
        values = {p.path: p.suggest(trial) for p in spec.params}
        trial_dir = (self.out / f"trial_{number:04d}").resolve()
        trial_dir.mkdir(parents=True, exist_ok=True)
        run_name = f"{spec.name}-t{number}"
        config = configs.fill_trial_dir(configs.trial_config(spec, values), trial_dir)
        if configs.is_experiment(config):
            config["name"], config["output_dir"] = run_name, str(trial_dir / "run")
        else:
            tracker = self.tracker
            config = configs.place_lightning_run(
                config, trial_dir / "run", tracker.experiment_name, run_name, tracker.uri
            )
        run_id = self.tracker.start_trial(self.parent, spec.name, number, trial.params, config)
        trial.set_user_attr("mlflow_run_id", run_id)
        trial.set_user_attr("trial_dir", str(trial_dir))
        started = time.monotonic()
        problem = checks.config_problem(config)
        if problem:
            outcome = Outcome("FAIL", kind="invalid", reason=f"invalid configuration: {problem}")
        else:
            outcome = self._run_fit(trial, config, trial_dir, run_id)
        self._record(trial, outcome, time.monotonic() - started, run_id, values)

    def _pruning_callbacks(self, number: int, config: dict[str, Any]) -> list[dict[str, Any]]:
        p = self.spec.pruning
        if p is None or self.spec.multi_objective:
            return []
        args = {
            "storage": self.url,
            "study_name": self.spec.name,
            "trial_number": number,
            "monitor": p.monitor,
            "pruner": p.pruner,
            "pruner_options": p.options,
            "every_n_steps": p.every_n_steps,
            # Optuna's pruners compare in the study's direction
            "sign": 1.0 if p.monitor_direction == self.spec.objectives[0].direction else -1.0,
            "stage_offsets": configs.stage_offsets(config) if configs.is_experiment(config) else {},
        }
        return [{"class_path": "src.sweep.pruning.OptunaStepPruning", "init_args": args}]

    def _run_fit(self, trial: optuna.trial.Trial, config: dict, trial_dir: Path, run_id: str) -> Outcome:
        experiment = configs.is_experiment(config)
        callbacks = self._pruning_callbacks(trial.number, config)
        env = child_env(self.threads_per_trial)
        if experiment:
            extra = ["--experiment_name", self.tracker.experiment_name, "--tracking_uri", self.tracker.uri]
            extra += ["--mlflow_parent_run_id", run_id]
            if callbacks:
                extra += ["--callbacks", json.dumps(callbacks)]
        else:  # a LightningCLI config carries everything; its MLflow logger nests under the trial run
            trainer = config["trainer"]
            trainer["callbacks"] = list(trainer.get("callbacks") or []) + callbacks
            env["DENSE2MOE_PARENT_RUN_ID"] = run_id
            extra = []
        (trial_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        cmd = fit_command(trial_dir / "config.yaml", extra)
        (trial_dir / "command.txt").write_text(" ".join(cmd) + "\n")
        beating = threading.Event()

        def heartbeat() -> None:
            while not beating.wait(self.spec.heartbeat_interval):
                trial.set_user_attr("heartbeat", time.time())

        beat = threading.Thread(target=heartbeat, daemon=True)
        beat.start()
        try:
            code, stopped = run_fit(
                cmd,
                trial_dir / "log.txt",
                env,
                self.stop,
                self.spec.trial.timeout,
                on_start=lambda pid: trial.set_user_attr("child_pid", pid),
            )
        finally:
            beating.set()
            beat.join()
        if stopped == "interrupted":
            return Outcome("INTERRUPTED", kind="interrupted", reason="interrupted by Ctrl-C or SIGTERM")
        if stopped == "timeout":
            return Outcome("FAIL", kind="timeout", reason=f"timed out after {self.spec.trial.timeout:g} s")
        if code != 0:
            attrs = self.frozen(trial.number).user_attrs
            if "pruned_at_step" in attrs:
                monitor = self.spec.pruning.monitor
                reason = f"pruned at step {attrs['pruned_at_step']} ({monitor} {attrs['pruned_value']:.4g})"
                return Outcome("PRUNED", kind="pruned", reason=reason)
            kind, reason = failure((trial_dir / "log.txt").read_text(errors="replace"), code)
            return Outcome("FAIL", kind=kind, reason=reason)
        names = [o.metric for o in self.spec.objectives]
        if experiment:
            metrics, problem = read_report(Path(config["output_dir"]))
            source = str(Path(config["output_dir"]) / "report" / "summary.json")
        else:
            metrics, problem = self.tracker.child_metrics(run_id), None
            source = "its MLflow run"
        if problem:
            return Outcome("FAIL", kind="metric", reason=problem)
        values, problem, missing = objective_values(metrics, names, source)
        if missing:  # a metric name the runs don't log: every trial would fail the same way
            self.errors.append(UserError(f"trial {trial.number}: {problem}; it logged {sorted(metrics)}"))
            self.stop.set()
        if problem:
            return Outcome("FAIL", metrics=metrics, kind="metric", reason=problem)
        return Outcome("COMPLETE", values=values, metrics=metrics)

    def _record(self, trial: optuna.trial.Trial, outcome: Outcome, seconds: float, run_id: str, values: dict) -> None:
        number = trial.number
        trial.set_user_attr("seconds", round(seconds, 1))
        wanted = [o.metric for o in self.spec.objectives] + list(self.spec.report_metrics)
        wanted += [f"{m}/{end}" for m in wanted for end in ("low", "high")]  # a metric's 95% interval, if it has one
        trial.set_user_attr("metrics", {k: v for k, v in outcome.metrics.items() if k in wanted})
        if outcome.state == "COMPLETE":
            self.study.tell(trial, outcome.values)
            objective = dict(zip([o.metric for o in self.spec.objectives], outcome.values))
            self.tracker.log_trial_on_study(self.parent, number, objective)
            shown = ", ".join(f"{k} {v:.4g}" for k, v in objective.items())
        elif outcome.state == "PRUNED":
            trial.set_user_attr("fail_reason", outcome.reason)
            self.study.tell(trial, state=TrialState.PRUNED)
            shown = outcome.reason
        else:
            self._fail(number, outcome.kind, outcome.reason, retry=outcome.state == "INTERRUPTED")
            shown = outcome.reason if outcome.reason.startswith(outcome.kind) else f"{outcome.kind}: {outcome.reason}"
        state = "FAIL" if outcome.state == "INTERRUPTED" else outcome.state
        self.tracker.finish_trial(run_id, state, outcome.metrics, None if state == "COMPLETE" else outcome.reason)
        params = ", ".join(f"{k}={v}" for k, v in values.items())
        self.say(f"trial {number} {state} in {seconds:.0f} s [{params}]: {shown}")

    # --- the process --------------------------------------------------------------------------------------------
    def _completed(self) -> int:
        return sum(1 for t in self.trials() if counts(t) and t.state.is_finished())

    def run(self) -> None:
        """The workers, a progress bar over the study's trials; KeyboardInterrupt after stopping the workers."""
        previous = signal.signal(signal.SIGTERM, _raise_interrupt)
        # A sweep started in the background of a non-interactive shell inherits SIGINT ignored; Ctrl-C / kill -INT
        # must still stop it, so the handler is installed explicitly.
        previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
        with local_lock(self.out):
            self.recover_stale()
        # Waiting on events, not Thread.join: a join interrupted by Ctrl-C can leave is_alive() wrongly False
        # (CPython gh-90882), and the trials must be stopped and recorded before the process exits.
        done = [threading.Event() for _ in range(self.workers)]
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        try:
            with Progress(*columns, console=self.console) as progress:
                task = progress.add_task(f"sweep {self.spec.name}", total=self.n_trials, completed=self._completed())
                for event in done:
                    threading.Thread(target=self.worker, args=(event,), daemon=True).start()
                while not all(event.wait(POLL_S) for event in done):
                    progress.update(task, completed=self._completed())
                progress.update(task, completed=self._completed())
        except KeyboardInterrupt:
            self.stop.set()
            self.say("stopping: interrupting the running trials…")
            while not all(event.is_set() for event in done):
                try:
                    time.sleep(0.5)
                except KeyboardInterrupt:
                    continue  # trials get SIGINT, then SIGKILL after a grace period: wait for them
            raise
        finally:
            signal.signal(signal.SIGTERM, previous)
            signal.signal(signal.SIGINT, previous_int)
        if self.errors:
            raise self.errors[0]


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _with_cli_values(spec: SweepSpec, **changes: Any) -> SweepSpec:
    changes = {k: v for k, v in changes.items() if v is not None}
    try:
        return dataclasses.replace(spec, **changes) if changes else spec
    except ValueError as err:
        raise UserError(f"{spec.source}: {err}") from None


def sweep(
    config: str,
    workers: int = 1,
    trials: int | None = None,
    timeout: float | None = None,
    storage: str | None = None,
    output_dir: str | None = None,
    dry_run: bool = False,
) -> dict[str, Any]:
    """Run, join or resume an Optuna study whose trials are experiments (sweep file format: sweeps/README.md).

    Args:
        config: The sweep file (sweeps/<name>.yaml).
        workers: Trials run at the same time by this command (the same command elsewhere adds more workers).
        trials: Trials in the study in all (overrides the file's ``trials``).
        timeout: Seconds after which this command starts no new trial (overrides the file's ``timeout``).
        storage: Optuna storage URL or journal file (overrides the file's ``storage``).
        output_dir: Folder for trial folders, plots and tables (overrides the file's ``output_dir``).
        dry_run: Check the sweep file and print the first trial's config, then stop.
    """
    if workers < 1:
        raise UserError(f"workers={workers}; allowed >= 1")
    spec = load_sweep(config)
    spec = _with_cli_values(spec, trials=trials, timeout=timeout, storage=storage, output_dir=output_dir)
    checks.check_sweep(spec)
    out = Path(spec.output_dir or os.path.join("runs", "sweeps", spec.name))
    url = normalize(spec.storage or default_storage(out))
    uri = resolve_tracking_uri(spec.tracking_uri)
    experiment_name = spec.experiment_name or f"sweep-{spec.name}"
    objectives = ", ".join(f"{o.metric} ({o.direction})" for o in spec.objectives)
    plan = (
        f"sweep {spec.name}: {spec.n_trials or 'unlimited'} trials ({spec.sampler.name} sampler), objectives "
        f"{objectives}\n  storage {url}\n  trials in {out}/trial_NNNN; MLflow experiment {experiment_name!r} at {uri}"
    )
    if dry_run:
        first = configs.trial_config(spec, {p.path: p.bounds()[0] for p in spec.params})
        print(plan + "\nfirst trial's config:\n" + yaml.safe_dump(first, sort_keys=False))
        return {"study": spec.name, "storage": url, "trials": spec.n_trials}
    check_writable_dir(str(out), "output_dir")
    check_tracking_uri(uri)
    out.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = open_study(spec, url)
    print(plan)
    if spec.pruning is not None and spec.multi_objective:
        print(f"note: pruning is off: Optuna cannot prune a multi-objective study ({len(spec.objectives)} objectives)")
    tracker = Tracker(uri, experiment_name)
    study_params = {
        "sampler": spec.sampler.name,
        "seed": spec.sampler.seed,
        "trials": spec.n_trials,
        "objectives": json.dumps({o.metric: o.direction for o in spec.objectives}),
        "storage": url,
        "pruning": spec.pruning.pruner if spec.pruning and not spec.multi_objective else "off",
    }
    parent = tracker.study_run(study, study_params, Path(spec.source).read_text())
    driver = Driver(spec, study, url, out, tracker, parent, workers)
    try:
        driver.run()
    except KeyboardInterrupt:
        tracker.finish_study(parent, "KILLED", {}, [])
        print(
            "interrupted: running trials recorded as failed (interrupted) and queued again; rerun to resume",
            file=sys.stderr,
        )
        raise SystemExit(130) from None
    except BaseException:
        tracker.finish_study(parent, "FAILED", {}, [])
        raise
    return finish(spec, study, out, tracker, parent, url, driver.finished())


def finish(
    spec: SweepSpec, study: optuna.Study, out: Path, tracker: Tracker, parent: str, url: str, done: bool
) -> dict[str, Any]:
    """Tables and plots, written and (when the whole study is done) logged to the study's run, which is closed."""
    text = report.tables(study, spec)
    (out / "best_trials.md").write_text(text)
    print(text)
    files, notes = report.plots(study, spec, out / "plots")
    for note in notes:
        print(f"note: {note}")
    if done:
        artifacts = [(out / "best_trials.md", "")] + [(f, "plots") for f in files]
        tracker.finish_study(parent, "FINISHED", report.summary_metrics(study, spec), artifacts)
    else:
        print("other workers are still running trials: the last one to finish logs the final tables and plots")
    print(f"Optuna dashboard: {dashboard_command(url)}")
    print(f"MLflow: mlflow ui --backend-store-uri {tracker.uri}  (experiment {tracker.experiment_name!r})")
    states: dict[str, int] = {}
    for t in report.ran(study.get_trials(deepcopy=False)):
        states[t.state.name] = states.get(t.state.name, 0) + 1
    return {"study": spec.name, "storage": url, "states": states, "done": done}

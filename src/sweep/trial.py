"""One trial = one ``python -m src.cli fit`` subprocess, and what became of it.

A subprocess, because DDP re-executes the command line and a crash must not take the study down. It runs in its
own session, so a Ctrl-C at the terminal reaches only the driver, which then interrupts it (SIGINT: Lightning
stops gracefully and MLflow runs are closed), and kills it if it has not stopped within a grace period.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STOP_GRACE_S = 30.0
"""Seconds a trial gets to stop after SIGINT before it is killed."""
OOM_MARKERS = ("out of memory", "OutOfMemoryError", "MemoryError")
NAN_MARKERS = ("loss is nan", "loss is inf", "loss is -inf", "NonFiniteLossError")
_EXCEPTION_LINE = re.compile(r"^([A-Za-z_][\w.]*(Error|Exception|Interrupt|Pruned|Exit))\b(:.*)?$")


@dataclass
class Outcome:
    """What a trial ended as."""

    state: str
    """"COMPLETE", "FAIL", "PRUNED" or "INTERRUPTED" (a FAIL that is retried and does not count)."""
    values: list[float] | None = None
    """Objective values (COMPLETE)."""
    metrics: dict[str, float] = field(default_factory=dict)
    """Every numeric metric of the run's report."""
    kind: str | None = None
    """Failure kind: "error", "crash", "nan", "oom", "timeout", "metric", "invalid", "interrupted", "pruned"."""
    reason: str | None = None
    """One line saying why (FAIL, PRUNED, INTERRUPTED)."""


def project_root() -> Path:
    return Path(__file__).resolve().parents[2]


def fit_command(config: Path, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "src.cli", "fit", "--config", str(config), *extra]


def child_env(threads: int | None) -> dict[str, str]:
    """The driver's environment, with the project importable and the CPU threads shared among local workers."""
    env = dict(os.environ)
    env.pop("DENSE2MOE_PARENT_RUN_ID", None)
    root = str(project_root())
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    # One value for both pools: a user's OMP_NUM_THREADS=1 must not leave MKL at cores/workers, which oversubscribes
    # the cores when several sweep commands share a machine.
    chosen = env.get("OMP_NUM_THREADS") or env.get("MKL_NUM_THREADS") or (str(threads) if threads else None)
    if chosen:
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env.setdefault(name, chosen)
    return env


def _default_sigint() -> None:
    """In the trial's child before exec: SIGINT back to its default, so the graceful stop reaches a trial even when
    the sweep itself was started with SIGINT ignored (a background job of a non-interactive shell)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def stop_process_group(proc: subprocess.Popen, grace: float = STOP_GRACE_S) -> None:
    """SIGINT to the trial's process group (graceful), SIGKILL if it is still there after ``grace`` seconds."""
    for sig, wait in ((signal.SIGINT, grace), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_fit(
    cmd: list[str],
    log_path: Path,
    env: dict[str, str],
    stop: threading.Event,
    timeout: float | None,
    on_start: Callable[[int], None],
) -> tuple[int, str | None]:
    """Runs the trial; returns (exit code, None) or (code, "interrupted" / "timeout") when it was stopped."""
    if stop.is_set():
        return 0, "interrupted"
    started = time.monotonic()
    with open(log_path, "ab") as log:
        log.write(("$ " + " ".join(cmd) + "\n").encode())
        log.flush()
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True, preexec_fn=_default_sigint
        )
    on_start(proc.pid)
    while True:
        try:
            return proc.wait(timeout=0.5), None
        except subprocess.TimeoutExpired:
            pass
        if stop.is_set():
            stop_process_group(proc)
            return proc.wait(), "interrupted"
        if timeout is not None and time.monotonic() - started > timeout:
            stop_process_group(proc)
            return proc.wait(), "timeout"


def failure(log_text: str, returncode: int) -> tuple[str, str]:
    """(kind, one-line reason) of a failed trial from its log and exit code."""
    lines = [line.strip() for line in log_text.splitlines() if line.strip()]
    errors = [line[len("error: ") :] for line in lines if line.startswith("error: ")]
    exceptions = [line for line in lines if _EXCEPTION_LINE.match(line)]
    last = errors[-1] if errors else exceptions[-1] if exceptions else None
    tail = "\n".join(lines[-60:])
    if any(marker in tail for marker in NAN_MARKERS):
        return "nan", last or "the loss became NaN/inf"
    if any(marker in tail for marker in OOM_MARKERS):
        line = next((ln for ln in reversed(lines) if any(m in ln for m in OOM_MARKERS)), last)
        return "oom", f"out of memory: {line}"
    if returncode < 0:
        name = signal.Signals(-returncode).name if -returncode in signal.Signals._value2member_map_ else -returncode
        hint = " (the kernel's out-of-memory killer, or another process)" if returncode == -signal.SIGKILL else ""
        return ("oom" if hint else "crash"), f"killed by {name}{hint}" + (f"; last error: {last}" if last else "")
    if errors:
        return "error", errors[-1]
    if last:
        return "crash", last
    return "crash", f"exit code {returncode}" + (f"; last output: {lines[-1][:200]}" if lines else "")


def objective_values(
    metrics: dict[str, float], names: list[str], source: str
) -> tuple[list[float] | None, str | None, list[str]]:
    """(values, problem, missing names) of the objectives among a run's metrics."""
    missing = [m for m in names if m not in metrics]
    if missing:
        return None, f"objective metric(s) {missing} not logged by the run ({source})", missing
    values = [metrics[m] for m in names]
    bad = [m for m, v in zip(names, values) if not math.isfinite(v)]
    if bad:
        return None, f"objective metric(s) {bad} are not finite ({source})", []
    return values, None, []


def read_report(run_dir: Path) -> tuple[dict[str, float], str | None]:
    """(numeric metrics, problem) of ``<run_dir>/report/summary.json``, a Dense2MoE experiment's end-of-fit report."""
    path = run_dir / "report" / "summary.json"
    if not path.is_file():
        return {}, f"the run finished without {path}"
    report: dict[str, Any] = json.loads(path.read_text())
    return {k: float(v) for k, v in report.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}, None

"""Check in a real browser that MLflow's UI shows what a multi-stage fit recorded, and take screenshots.

Runs ``fit --config experiments/debug.yaml`` into a fresh SQLite store, starts ``mlflow server`` on 127.0.0.1, and
opens the parent run, a stage run, the parent's artifacts and the compare view of all the experiment's runs in
headless Chromium (Debian's ``chromium`` package; ``--dump-dom`` after the page's scripts ran). It asserts that
the parent page lists the layout parameters (and at least 20 parameters in all), the stage page its stage kind,
the artifacts page ``config.yaml`` and the compare view the layout column, then writes one screenshot per page.

    python scripts/mlflow_ui_check.py --out docs/mlflow       # needs /usr/bin/chromium (apt install chromium)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
)
PARENT_PARAMS = ("student/conversion/layout", "student/mob/group_size", "teacher/sha256", "data/world")


def chromium() -> str | None:
    """Path of a Chromium binary, or None."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _browse(browser: str, url: str, profile: Path, screenshot: Path | None = None) -> str:
    """The page's DOM after its scripts ran (and a screenshot when asked)."""
    base = [browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=20000"]
    dom = subprocess.run([*base, "--dump-dom", url], capture_output=True, text=True, timeout=180, check=True).stdout
    if screenshot is not None:
        subprocess.run(
            [*base, "--window-size=1500,2400", f"--screenshot={screenshot}", url],
            capture_output=True,
            timeout=180,
            check=True,
        )
    return dom


def check(out: Path, keep: Path | None = None) -> dict[str, str]:
    """Run the fit, serve its store, open the pages; AssertionError naming what a page lacks. Returns screenshots."""
    browser = chromium()
    if browser is None:
        raise RuntimeError("no Chromium found (Debian: apt install chromium)")
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="mlflow_ui_")) if keep is None else keep
    work.mkdir(parents=True, exist_ok=True)
    store = f"sqlite:///{work / 'mlflow.db'}"
    env = os.environ | {"MLFLOW_TRACKING_URI": store, "OMP_NUM_THREADS": "1"}
    env.pop("DENSE2MOE_PARENT_RUN_ID", None)
    fit = [sys.executable, "-m", "src.cli", "fit", "--config", str(ROOT / "experiments" / "debug.yaml")]
    fit += ["--output_dir", str(work / "run"), "--threads", "1"]
    subprocess.run(fit, cwd=ROOT, env=env, check=True, capture_output=True, timeout=900)

    from mlflow import MlflowClient  # after the fit, so this process never creates the store itself

    client = MlflowClient(tracking_uri=store)
    (experiment,) = [e for e in client.search_experiments() if e.name != "Default"]
    runs = client.search_runs([experiment.experiment_id])
    parent = next(r for r in runs if r.data.tags.get("kind") == "dense2moe")
    stage = next(r for r in runs if r.data.tags.get("kind") == "stage")
    port = _free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            store,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        cwd=work,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{base}/health", timeout=2)
                break
            except OSError:
                time.sleep(1)
        else:
            raise RuntimeError("mlflow server did not answer on /health within 120 s")
        exp = experiment.experiment_id
        ids = json.dumps([r.info.run_id for r in runs])
        # MLflow 3's UI opens in its GenAI view unless told otherwise: a UI setting (browser storage), which the
        # workflowType query parameter overrides; the experiment's mlflow.experimentKind tag does not switch it
        ml = "workflowType=machine_learning"
        runs_q, exps_q = urllib.parse.quote(ids), urllib.parse.quote(json.dumps([exp]))
        pages = {
            "parent_run": f"{base}/#/experiments/{exp}/runs/{parent.info.run_id}?{ml}",
            "stage_run": f"{base}/#/experiments/{exp}/runs/{stage.info.run_id}?{ml}",
            "parent_artifacts": f"{base}/#/experiments/{exp}/runs/{parent.info.run_id}/artifacts?{ml}",
            "compare": f"{base}/#/compare-runs?runs={runs_q}&experiments={exps_q}&{ml}",
        }
        profile = work / "chromium-profile"
        doms = {name: _browse(browser, url, profile, out / f"{name}.png") for name, url in pages.items()}
    finally:
        server.terminate()
        server.wait(timeout=30)
    layout = parent.data.params["student/conversion/layout"]
    assert len(parent.data.params) >= 20, f"parent run has {len(parent.data.params)} params; expected >= 20"
    for key in PARENT_PARAMS:
        assert key in doms["parent_run"], f"parent run page does not show parameter {key}"
    assert layout in doms["parent_run"], f"parent run page does not show the layout value {layout}"
    assert stage.data.tags["stage_kind"] in doms["stage_run"], "stage run page does not show its stage kind"
    assert "config.yaml" in doms["parent_artifacts"], "artifacts page does not list config.yaml"
    assert "student/conversion/layout" in doms["compare"], "compare view does not show the layout parameter"
    return {name: str(out / f"{name}.png") for name in pages}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="docs/mlflow", help="folder for the screenshots")
    args = parser.parse_args()
    shots = check(Path(args.out))
    print("MLflow UI check passed; screenshots:", ", ".join(shots.values()))


if __name__ == "__main__":
    main()

"""MLflow's UI, in a real headless browser, shows what a multi-stage fit recorded (scripts/mlflow_ui_check.py).

Needs Chromium (Debian: ``apt install chromium``); skipped without it. The screenshots in docs/mlflow/ come from
``python scripts/mlflow_ui_check.py --out docs/mlflow``.
"""

from __future__ import annotations

import pytest

from scripts.mlflow_ui_check import check, chromium


@pytest.mark.skipif(chromium() is None, reason="no Chromium on this machine (apt install chromium)")
def test_the_ui_shows_parameters_stage_kind_artifacts_and_the_compare_view(tmp_path):
    shots = check(tmp_path / "shots", keep=tmp_path / "work")
    for path in shots.values():
        with open(path, "rb") as png:
            assert png.read(8) == b"\x89PNG\r\n\x1a\n"

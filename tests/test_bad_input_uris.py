"""Tracking URIs and study storages that cannot work: one line naming the value and what is allowed, up front."""

import pytest
from conftest import ROOT
from test_cli import digest, one_error_line, run_cli

from src.errors import UserError
from src.sweep.storage import normalize
from src.training.mlflow_logging import check_tracking_uri

DEBUG = str(ROOT / "experiments" / "debug.yaml")


@pytest.mark.parametrize("uri", ["foo://bar", "s3://bucket/mlruns", "postgres+x://u@h/db"])
def test_unknown_tracking_scheme(uri):
    with pytest.raises(UserError, match="unknown scheme"):
        check_tracking_uri(uri)


def test_database_schemes_with_a_driver_pass_the_scheme_check():
    check_tracking_uri("databricks")  # no network for these: the scheme is what is checked
    with pytest.raises(UserError, match="unknown scheme 'postgress'"):
        check_tracking_uri("postgress://u@h/db")


def test_fit_refuses_unknown_scheme_before_taylor(capsys, workdir):
    before = digest(workdir / "mlflow.db")
    code, out, err = run_cli(["fit", "--config", DEBUG, "--tracking_uri", "foo://bar", "--output_dir", "o"], capsys)
    line = one_error_line(err)
    assert code == 2 and "'foo://bar': unknown scheme 'foo'" in line and "allowed" in line
    assert "Taylor" not in out and digest(workdir / "mlflow.db") == before


def test_evaluate_refuses_unknown_scheme_before_generating(capsys, workdir):
    teacher = str(ROOT / "checkpoints" / "teacher_tiny")
    code, _, err = run_cli(["evaluate", "--model", teacher, "--tracking_uri", "foo://x", "--out", "ev"], capsys)
    assert code == 2 and "unknown scheme" in one_error_line(err)
    assert not (workdir / "ev").exists()


@pytest.mark.parametrize("url, expected", [("journal:", "an empty path"), ("journal:  ", "an empty path")])
def test_journal_without_a_path(url, expected):
    with pytest.raises(UserError, match=expected):
        normalize(url)


def test_journal_naming_a_folder(workdir):
    with pytest.raises(UserError, match="got the folder"):
        normalize(f"journal:{workdir}")


def test_sweep_with_empty_journal(capsys, workdir):
    args = ["sweep", "--config", str(ROOT / "sweeps" / "debug.yaml"), "--storage", "journal:", "--output_dir", "sw"]
    code, _, err = run_cli(args, capsys)
    assert code == 2 and "journal needs a file path" in one_error_line(err)
    assert not (workdir / "sw").exists()

"""Output folders that cannot be written, and writes that fail half-way: one line, nothing half-written left."""

import errno
import os

import pytest
from conftest import ROOT
from test_cli import one_error_line, run_cli

from src.errors import UserError
from src.folders import check_writable_dir

TEACHER = str(ROOT / "checkpoints" / "teacher_tiny")


@pytest.mark.parametrize("command", ["evaluate", "export"])
def test_out_below_a_file(command, capsys, workdir):
    (workdir / "a_file").write_text("x")
    args = {
        "evaluate": ["evaluate", "--model", TEACHER, "--log_mlflow", "false", "--out", "a_file/x", "--limit", "6"],
        "export": ["export", "--ckpt", TEACHER, "--out", "a_file/x"],
    }[command]
    code, _, err = run_cli(args, capsys)
    line = one_error_line(err)
    assert code == 2 and "out a_file/x: not writable" in line and "is a file, not a folder" in line
    assert (workdir / "a_file").read_text() == "x"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_folder(workdir):
    (workdir / "ro").mkdir(mode=0o500)
    with pytest.raises(UserError, match="not writable"):
        check_writable_dir(str(workdir / "ro" / "x"), "out")


def test_probe_writes_instead_of_trusting_permission_bits(workdir, monkeypatch):
    """A read-only mount (or a full disk) shows only when written to; root passes every os.access check."""
    import tempfile

    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "TemporaryFile", refuse)
    with pytest.raises(UserError, match="out x/y: not writable .*Read-only file system"):
        check_writable_dir("x/y", "out")


def test_export_that_fails_half_way_leaves_nothing(capsys, workdir, monkeypatch):
    from diffusers import ModelMixin

    def full_disk(self, folder, *args, **kwargs):
        os.makedirs(folder, exist_ok=True)
        (folder / "diffusion_pytorch_model.safetensors").write_bytes(b"trunc")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ModelMixin, "save_pretrained", full_disk)
    code, _, err = run_cli(["export", "--ckpt", TEACHER, "--out", "ex"], capsys)
    assert code == 2 and "No space left on device" in one_error_line(err)
    assert sorted(p.name for p in workdir.iterdir()) == ["mlflow.db"]

"""Prompt files that are not text, are empty or have another suffix: one line naming the file, nothing generated."""

import pytest
from conftest import ROOT
from test_cli import one_error_line, run_cli

TEACHER = str(ROOT / "checkpoints" / "teacher_tiny")


@pytest.mark.parametrize(
    "name, content, expected",
    [
        ("p.txt", bytes(range(256)) * 4, "not UTF-8 text (byte 128)"),
        ("p.txt", b"a photo of a circle\x00\x00", "holds NUL bytes"),
        ("p.jsonl", b"\n  \n", "no prompts in it"),
        ("p.csv", b"prompt\na photo of a circle\n", "suffix '.csv'; allowed .txt"),
    ],
    ids=["binary", "nul", "empty", "suffix"],
)
def test_bad_prompt_file(name, content, expected, capsys, workdir):
    (workdir / name).write_bytes(content)
    args = ["evaluate", "--model", TEACHER, "--prompts", name, "--log_mlflow", "false", "--out", "ev"]
    code, _, err = run_cli(args, capsys)
    line = one_error_line(err)
    assert code == 2 and f"prompt file {name}: {expected}" in line, line
    assert not (workdir / "ev").exists()

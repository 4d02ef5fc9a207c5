"""Config files that are not YAML mappings: one ``error:`` line naming the file (and line:column), nothing run."""

import pytest
from test_cli import one_error_line, run_cli


@pytest.mark.parametrize("command", ["fit", "params", "sweep"])
def test_syntax_error_names_file_line_and_column(command, capsys, workdir):
    (workdir / "bad.yaml").write_text("name: x\nstages:\n  - {name: a, kind: shared_kd\n")
    code, _, err = run_cli([command, "--config", str(workdir / "bad.yaml")], capsys)
    line = one_error_line(err)
    assert code == 2 and f"{workdir / 'bad.yaml'}:4:1: YAML syntax error" in line, line


def test_tab_indentation_points_at_the_tab(capsys, workdir):
    (workdir / "tab.yaml").write_text("name: x\nteacher:\n\tpath: y\n")
    code, _, err = run_cli(["fit", "--config", "tab.yaml"], capsys)
    assert code == 2 and "tab.yaml:3:1: YAML syntax error" in one_error_line(err)


@pytest.mark.parametrize("text", ["", "\n# only a comment\n"], ids=["empty", "comment"])
def test_empty_config(text, capsys, workdir):
    (workdir / "empty.yaml").write_text(text)
    code, _, err = run_cli(["fit", "--config", "empty.yaml"], capsys)
    line = one_error_line(err)
    assert code == 2 and "empty.yaml: the file is empty" in line and "mapping" in line


def test_top_level_list(capsys, workdir):
    (workdir / "list.yaml").write_text("- name: x\n")
    code, _, err = run_cli(["fit", "--config", "list.yaml"], capsys)
    assert code == 2 and "top level is a list; expected a mapping" in one_error_line(err)


def test_missing_and_binary_config(capsys, workdir):
    code, _, err = run_cli(["fit", "--config", "nowhere.yaml"], capsys)
    assert code == 2 and "nowhere.yaml: no such file" in one_error_line(err)
    (workdir / "bin.yaml").write_bytes(bytes(range(256)))
    code, _, err = run_cli(["evaluate", "--config", "bin.yaml"], capsys)
    assert code == 2 and "bin.yaml: not UTF-8 text" in one_error_line(err)
    assert not (workdir / "runs").exists()

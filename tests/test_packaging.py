"""Packaging facts a fresh clone depends on."""

import re
import tomllib

import yaml
from conftest import ROOT


def _names(requirements: list[str]) -> dict[str, str]:
    out = {}
    for req in requirements:
        name = re.split(r"[<>=!~\[ ;]", req, maxsplit=1)[0].lower().replace("_", "-")
        out[name] = req.replace(" ", "")
    return out


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = _names(project["dependencies"] + project["optional-dependencies"]["dev"])
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    listed = _names([r for r in pip if not r.startswith("-")])
    assert listed == wanted


def test_constraints_pin_every_dependency_and_torch_exactly():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pinned = _names([ln for ln in (ROOT / "constraints.txt").read_text().splitlines() if ln and not ln.startswith("#")])
    for name in _names(project["dependencies"] + project["optional-dependencies"]["dev"]):
        assert name in pinned, f"{name} is not pinned in constraints.txt"
    # '===' so pip never swaps in a local build (e.g. '+cpu') that has no matching torchvision.
    assert pinned["torch"].startswith("torch===")


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in readme and "make run" in readme
    assert re.search(r"^make test$", ci, re.M)


def test_main_job_config_exists():
    makefile = (ROOT / "Makefile").read_text()
    config = re.search(r"^MAIN_CONFIG \?= (\S+)", makefile, re.M).group(1)
    assert (ROOT / config).is_file()

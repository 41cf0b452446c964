"""The package metadata agrees with itself: pyproject.toml, environment.yml, the README commands and CI."""
import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _name(requirement: str) -> str:
    """Distribution name of a requirement string, normalised (PEP 503)."""
    name = re.split(r"[\s<>=!~\[;]", requirement.strip(), maxsplit=1)[0]
    return re.sub(r"[-_.]+", "-", name).lower()


def _pyproject_requirements() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        reqs += extra
    return {_name(r) for r in reqs}


def _conda_requirements() -> set[str]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    names = set()
    for dep in env["dependencies"]:
        if isinstance(dep, dict):
            names |= {_name(r) for r in dep["pip"] if not r.startswith("-e")}
        elif not dep.startswith(("python", "pip")):
            names.add(_name(dep))
    return names


def test_environment_yml_matches_pyproject():
    pyproject, conda = _pyproject_requirements(), _conda_requirements()
    assert pyproject - conda == set(), f"in pyproject.toml but not environment.yml: {sorted(pyproject - conda)}"
    assert conda - pyproject == set(), f"in environment.yml but not pyproject.toml: {sorted(conda - pyproject)}"


def test_torch_is_pinned_to_the_cpu_build_everywhere_it_is_installed():
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    assert "torch==2.13.0" in setup
    conda = (ROOT / "environment.yml").read_text()
    assert re.search(r"torch==2\.13\.0", conda)


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in readme and "make course" in readme
    assert re.search(r"^make test$", ci, flags=re.M)


def test_console_script_is_declared():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["mirlab"] == "mirlab.cli:main"


def test_quick_target_runs_the_fast_tests_without_nbval():
    makefile = (ROOT / "Makefile").read_text()
    quick = re.search(r"^quick:.*\n\t(.+)$", makefile, flags=re.M)
    assert quick, "Makefile has no `quick` target"
    assert '-m "not slow and not browser"' in quick.group(1) and "-p no:nbval" in quick.group(1)
    assert "make quick" in (ROOT / "README.md").read_text()
    # nbval's options live in tests/conftest.py, not addopts: with them in addopts, `-p no:nbval` would fail
    addopts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["addopts"]
    assert "nbval" not in addopts

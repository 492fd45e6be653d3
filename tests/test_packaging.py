"""pyproject.toml and environment.yml name the same dependencies."""
import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _name(req: str) -> str:
    return re.split(r"[<>=!~\[; ]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = {_name(r) for r in project["dependencies"]}
    wanted |= {_name(r) for extra in project["optional-dependencies"].values() for r in extra}
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    assert {_name(r) for r in pip_section} == wanted


def test_setup_pins_match_environment_yml():
    """scripts/setup.sh pins torch/torchvision; environment.yml must pin the same versions."""
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    env = (ROOT / "environment.yml").read_text()
    for pin in re.findall(r'"(torch(?:vision)?==[\d.]+)"', setup):
        assert pin in env, pin
    assert re.findall(r'"(torch(?:vision)?==[\d.]+)"', setup), "setup.sh pins nothing"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    command = ci.strip().splitlines()[-1]
    assert command in readme

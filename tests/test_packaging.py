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


CONSOLE_SCRIPTS = {"nbcore-train": "nbcore.cli.train:main", "nbcore-validate": "nbcore.cli.validate:main",
                   "nbcore-suite": "nbcore.runner:main", "nbcore-shapes": "nbcore.cli.shapes:main",
                   "nbcore-data": "nbcore.cli.data:main", "nbcore-bench": "nbcore.cli.bench:main",
                   "nbcore-encoders": "nbcore.cli.encoders:main",
                   "nbcore-generate": "nbcore.cli.generate:main"}


def test_console_scripts_point_at_callable_mains():
    """Every [project.scripts] target imports and is a callable taking argv; --help exits 0."""
    import importlib
    import inspect

    import pytest

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == CONSOLE_SCRIPTS
    for name, target in scripts.items():
        module, func = target.split(":")
        fn = getattr(importlib.import_module(module), func)
        assert callable(fn) and "argv" in inspect.signature(fn).parameters, name
        with pytest.raises(SystemExit) as e:
            fn(["--help"])
        assert e.value.code == 0, name


def test_gpu_recipes_live_in_the_repository():
    """scripts/gpu_host.sh and its wheelhouse need nothing outside the repository."""
    for name in ("gpu_host.sh", "wheelhouse.sh"):
        text = (ROOT / "scripts" / name).read_text()
        assert "../shared" not in text, name
    assert "scripts/wheelhouse.sh" in (ROOT / "scripts" / "gpu_host.sh").read_text()

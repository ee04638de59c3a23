"""pyproject.toml, checked without installing anything: the dependencies are requirements.txt's pins,
every package and ds_configs/ are in the distribution, each console script runs its program.
(`pip install .` / `pip install -e .` in a fresh venv were checked by hand; see the README.)"""

import sys
import tomllib
from pathlib import Path

import pytest

from ds_longformer import scripts
from ds_longformer.engine import ds_config

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def test_dependencies_are_the_pins_of_requirements_txt():
    """One list: setuptools reads requirements.txt (what the README's `pip install -r` installs)."""
    pyprojecttoml = pytest.importorskip("setuptools.config.pyprojecttoml")
    expanded = pyprojecttoml.read_configuration(REPO / "pyproject.toml", expand=True)
    pins = [line.strip() for line in (REPO / "requirements.txt").read_text().splitlines()
            if line.strip() and not line.lstrip().startswith("#")]
    assert expanded["project"]["dependencies"] == pins
    assert all("==" in pin for pin in pins), pins


def test_every_package_and_the_ds_configs_are_distributed():
    setuptools = PYPROJECT["tool"]["setuptools"]
    packages = sorted(".".join(init.parent.relative_to(REPO).parts) for init in REPO.glob("ds_longformer/**/__init__.py"))
    assert sorted(setuptools["packages"]) == sorted(packages + ["ds_longformer.ds_configs"])
    assert setuptools["package-dir"] == {"ds_longformer.ds_configs": "ds_configs"}
    assert setuptools["package-data"] == {"ds_longformer.ds_configs": ["*.json"]}


def test_config_dir_is_found_in_a_checkout_and_in_an_installed_package(tmp_path, monkeypatch):
    assert ds_config.find_config_dir() == REPO / "ds_configs"
    installed = tmp_path / "site-packages" / "ds_longformer"
    (installed / "ds_configs").mkdir(parents=True)
    monkeypatch.setattr(ds_config, "__file__", str(installed / "engine" / "ds_config.py"))
    assert ds_config.find_config_dir() == installed / "ds_configs"


@pytest.mark.filterwarnings("ignore:.*found in sys.modules:RuntimeWarning")  # run as __main__ after an import
@pytest.mark.parametrize("program", scripts.PROGRAMS)
def test_each_console_script_runs_its_program(program, monkeypatch, capsys):
    entry_points = PYPROJECT["project"]["scripts"]
    assert sorted(entry_points) == sorted(f"ds-longformer-{p}" for p in scripts.PROGRAMS)
    assert entry_points[f"ds-longformer-{program}"] == f"ds_longformer.scripts:{program}"
    monkeypatch.setattr(sys, "argv", [f"ds-longformer-{program}", "--help"])
    with pytest.raises(SystemExit) as exit_:
        getattr(scripts, program)()
    assert exit_.value.code == 0 and f"python -m ds_longformer.{program}" in capsys.readouterr().out

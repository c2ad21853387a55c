"""One distribution; components import as fleetlens.<component>, nothing generic leaks."""

from __future__ import annotations

import importlib
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def test_every_python_package_folder_is_listed():
    setuptools = PYPROJECT["tool"]["setuptools"]
    package_dir = setuptools["package-dir"]
    listed = set(setuptools["packages"])
    found = set()
    for package, folder in package_dir.items():
        for init in (REPO / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(REPO / folder)
            found.add(".".join([package, *relative.parts]))
    assert found == listed


def test_components_import_under_fleetlens(tmp_path):
    for component in ("collector", "serving", "dashboards", "evals", "dags"):
        module = importlib.import_module(f"fleetlens.{component}")
        assert Path(module.__file__).resolve().parent == REPO / component
    # From a neutral directory (not the checkout), as an installed user would import.
    probe = (
        "import importlib.util, sys\n"
        "names = ['collector', 'serving', 'dashboards', 'evals', 'dags', 'dbt_project']\n"
        "leaked = [n for n in names if importlib.util.find_spec(n) is not None]\n"
        "assert importlib.util.find_spec('fleetlens.serving') is not None\n"
        "sys.exit(1 if leaked else 0) if not leaked else print(leaked) or sys.exit(1)\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_console_script_is_declared():
    assert PYPROJECT["project"]["scripts"]["fleetlens"] == "fleetlens.cli:main"

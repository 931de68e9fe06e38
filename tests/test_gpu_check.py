"""`benchmarks/gpu_check.py` runs on CPU at tiny sizes (so its GPU mode cannot rot while no GPU is at hand):
every section measures something, nothing fails, and the JSON and markdown reports are written."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def run(out: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), "--device", "cpu", *args],
                          capture_output=True, text=True, env=env, cwd=ROOT)  # fmt: skip


def test_gpu_check_runs_every_section_on_cpu_at_tiny_sizes(tmp_path):
    proc = run(tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    rows = report["rows"]
    assert report["meta"]["size"] == "tiny" and report["meta"]["device"] == "cpu"
    assert all(r["status"].startswith("ok") for r in rows), [r["status"] for r in rows]
    by = {(r["benchmark"], r["case"]): r for r in rows}

    train = [r for r in rows if r["benchmark"] == "train"]
    assert [(r["mode"], r["compiled"]) for r in train] == [
        ("ehr_only", False), ("none", False), ("mean", False), ("latent", False), ("ehr_only", True), ("latent", True),
    ]  # fmt: skip
    for r in train:  # random init: the loss is about ln(vocab), and every figure is a real measurement
        assert abs(r["loss"] - math.log(128)) < 0.5
        assert r["tokens_per_s"] > 0 and 0 < r["fraction_of_matmul"] < 10 and r["peak_mem_mb"] > 0

    rollouts = [r for r in rows if r["benchmark"] == "rollout"]
    assert [(r["mode"], r["rollouts_in_batch"], r["kv_cache"]) for r in rollouts] == [
        ("ehr_only", 4, True), ("ehr_only", 8, True), ("latent", 8, True), ("ehr_only", 4, False),
    ]  # fmt: skip
    assert all(r["generated_tok_per_s"] > 0 and r["context"] == 64 for r in rollouts)

    # Real-architecture encoders (tiny widths, real geometry): the real token counts per event.
    tokens = {case: r["tokens_per_event"] for (bench, case), r in by.items() if bench == "encoders"}
    assert tokens == {"bert": 512, "vit-mae": 197, "biomedclip": 197, "ecg-fm": 312, "csfm": 1201}

    tests = by["tests", "pytest -m gpu tests/test_gpu.py"]
    # On CPU the mask tests run under CPU bf16 autocast (3 compressions + 2 of the EHR-only equivalence).
    assert tests["tests"] == 5 and tests["passed"] == 5 and tests["failures"] == tests["errors"] == 0
    assert tests["status"].startswith("ok (on CPU: the mask tests only")

    md = (tmp_path / "gpu_check.md").read_text()
    for section in ("environment", "matmul", "train", "rollout", "encoders", "tests"):
        assert f"### {section}" in md
    assert "latent torch.compile (aot_eager)" in md


def test_cases_past_the_time_budget_are_skipped_and_reported(tmp_path):
    proc = run(tmp_path, "--budget-s", "0", "--skip", "encoders", "tests", "compile")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads((tmp_path / "gpu_check.json").read_text())["rows"]
    assert len(rows) == 2 + 4 + 4  # environment, matmul, 4 training modes, 4 rollout cases
    assert all(r["status"].startswith("skipped: ") and "budget" in r["status"] for r in rows)


def test_profile_train_step_times_each_mode_and_profiles_the_latent_step(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1"}
    script = ROOT / "benchmarks" / "profile_train_step.py"
    proc = subprocess.run([sys.executable, str(script), "--out", str(tmp_path), "--steps", "1"],
                          capture_output=True, text=True, env=env, cwd=ROOT)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = (tmp_path / "profile_train_step.txt").read_text()
    times = [line for line in report.splitlines() if line.endswith("ms/step")]
    assert [t.split(":")[0] for t in times] == [
        "ehr_only",
        "mean",
        "latent, media keys/values folded",
        "latent, media keys/values folded",
    ]
    assert all(float(t.split()[-2]) > 0 for t in times)
    assert "latent, 3 steps, by host time:" in report and "aten::" in report

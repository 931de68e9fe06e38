"""End to end: `mmehr demo --fast` runs every stage on real files, writes a report, and resumes."""

import json
import math
import time

import numpy as np
import polars as pl
import pytest

from mmehr.demo import TASKS


def test_demo_writes_a_report_comparing_both_models_on_four_tasks(fast_demo_out):
    report = (fast_demo_out / "report.md").read_text()
    for task in TASKS:
        assert f"### {task}" in report
    assert "| ehr_only/seed0 |" in report and "| all_three/seed0 |" in report
    assert "AUROC - ehr_only/seed0" in report  # the paired difference column
    html = (fast_demo_out / "report.html").read_text()
    assert "<table>" in html and "<img" in html
    for png in (fast_demo_out / "report_plots").glob("*.png"):
        assert png.read_bytes()[:4] == b"\x89PNG"
    assert len(list((fast_demo_out / "report_plots").glob("compare_*.png"))) == len(TASKS)


def test_demo_predictions_follow_the_meds_prediction_schema(fast_demo_out):
    for run in ("ehr_only", "all_three"):
        for task in TASKS:
            unit = fast_demo_out / "experiments" / "runs" / run / "seed0" / "eval" / task
            pred = pl.read_parquet(unit / "predictions.parquet")
            assert {"subject_id", "prediction_time", "boolean_value", "predicted_boolean_value"} <= set(
                pred.columns
            )
            p = pred["predicted_boolean_probability"].to_numpy()
            assert ((p >= 0) & (p <= 1)).all()
            # Probabilities are fractions of the counted ones of the 4 rollouts of --fast.
            n = pl.read_parquet(unit / "samples.parquet").drop_nulls("predicted_boolean_probability")
            k = n["counted_rollouts"].to_numpy()
            assert ((k >= 1) & (k <= 4)).all() and len(k) == len(p)
            np.testing.assert_allclose(p * k, np.round(p * k), atol=1e-5)


def test_references_come_with_their_auroc_at_the_zero_shot_rollouts(fast_demo_out):
    for task in TASKS:
        evals = fast_demo_out / "experiments" / "runs" / "all_three" / "seed0" / "eval"
        ref = json.loads((evals / task / "metrics.json").read_text())["reference"]
        for name in ("ehr", "ehr+all"):
            sampled = ref[name]["auroc_at_rollouts"]
            if sampled["value"] is not None and not math.isnan(sampled["value"]):  # both classes present
                assert 0.0 <= sampled["value"] <= 1.0 and sampled["draws"] > 0
    assert "matched, sampled like zero-shot" in (evals / "summary.md").read_text()


def test_multimodal_run_trains_gates_and_ehr_only_has_none(fast_demo_out):
    runs = fast_demo_out / "experiments" / "runs"
    mm = [json.loads(x) for x in (runs / "all_three/seed0/train/metrics.jsonl").read_text().splitlines()]
    ehr = [json.loads(x) for x in (runs / "ehr_only/seed0/train/metrics.jsonl").read_text().splitlines()]
    assert any(r.get("gates") for r in mm)
    assert not any(r.get("gates") for r in ehr)


def test_demo_rerun_skips_completed_stages(fast_demo_out, run_fast_demo):
    t0 = time.perf_counter()
    result = run_fast_demo(fast_demo_out)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("already complete") == 8  # synth, tokenize, 3 x index, 3 x encode
    assert "$ mmehr train" not in result.stdout and "$ mmehr evaluate" not in result.stdout
    assert time.perf_counter() - t0 < 60


def test_only_picks_study_runs_and_needs_study(tmp_path):
    from mmehr.demo import demo

    with pytest.raises(ValueError, match="--only picks runs of the study grid"):
        demo(tmp_path / "out", fast=True, only=["ehr_only"])
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_the_study_commands_cover_both_tables_between_them():
    """`make study`, `make study-table2`, `-table1`, `-table1-latent` and `-table1-k16` each train a part of
    the study grid (to stay under 2 hours); between them every run of its tables, each once."""
    import re
    from pathlib import Path

    import yaml

    root = Path(__file__).resolve().parents[1]
    grid = yaml.safe_load((root / "configs/grids/demo-study.yaml").read_text())
    makefile = (root / "Makefile").read_text()
    parts = dict(re.findall(r"^((?:STUDY|TABLE\w*)_RUNS) = (.+)$", makefile, flags=re.M))
    assert set(parts) == {"STUDY_RUNS", "TABLE2_RUNS", "TABLE1_RUNS", "TABLE1_LATENT_RUNS", "TABLE1_K16_RUNS"}
    targets = {
        "study": "STUDY_RUNS",
        "study-table2": "TABLE2_RUNS",
        "study-table1": "TABLE1_RUNS",
        "study-table1-latent": "TABLE1_LATENT_RUNS",
        "study-table1-k16": "TABLE1_K16_RUNS",
    }
    for target, variable in targets.items():
        assert re.search(rf"^{target}: .*\n\t.*--study --only \$\({variable}\)$", makefile, flags=re.M)
    picked = [run for runs in parts.values() for run in runs.split()]
    assert len(picked) == len(set(picked))  # no run in two commands
    assert set(picked) == {run for table in grid["tables"] for run in table["runs"]}
    assert set(picked) <= set(grid["runs"])

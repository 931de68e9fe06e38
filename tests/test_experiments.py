import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from mmehr.experiments import Grid, TableSpec, load_grid, tables_markdown
from mmehr.report import markdown_to_html, planted_signal

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _results(rows):
    schema = ["run", "seed", "variant", "task", "metric", "value", "lo", "hi"]
    return pl.DataFrame(rows, schema=schema, orient="row")


def test_shipped_grids_load_and_name_only_defined_runs():
    for path in (CONFIGS / "grids").glob("*.yaml"):
        grid, base = load_grid(path)
        assert base.is_file()
        assert grid.tables, path
        for t in grid.tables:
            assert set(t.runs) <= set(grid.runs)


def test_mimic_grid_has_the_papers_table_rows():
    grid, _ = load_grid(CONFIGS / "grids" / "mimic-iv.yaml")
    compression, modalities = grid.tables
    assert len(compression.runs) == 8  # none, mean, k in {8, 16} x l in {1, 2, 4}
    assert modalities.runs[0] == "ehr_only" and modalities.runs[-1] == "all_three"


def test_grid_errors_name_the_problem(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("data: {}\n")
    bad = tmp_path / "g.yaml"
    bad.write_text("base: base.yaml\nruns: {a: []}\ntables: [{title: T, runs: [a, b]}]\n")
    with pytest.raises(ValueError, match=r"runs \['b'\]"):
        load_grid(bad)
    bad.write_text("base: nowhere.yaml\nruns: {a: []}\n")
    with pytest.raises(FileNotFoundError, match=r"nowhere\.yaml"):
        load_grid(bad)


def test_tables_show_mean_and_spread_over_seeds_and_ci_for_one_seed():
    grid = Grid(base="x", runs={"ehr": [], "mm": []}, tasks=["icu_mortality"], seeds=[0, 1])
    grid.tables = [TableSpec(title="Table 2", runs=["ehr", "mm"], task="icu_mortality")]
    rows = []
    for run, vals in (("ehr", (0.70, 0.72)), ("mm", (0.80, 0.84))):
        for seed, v in enumerate(vals):
            for metric in ("auroc", "auprc", "f1_macro", "f1_pos"):
                rows.append((run, seed, "full", "icu_mortality", metric, v, v - 0.05, v + 0.05))
    rows.append(("mm", 0, "without_note", "icu_mortality", "auroc", 0.71, 0.66, 0.76))
    for seed, sampled in enumerate((0.86, 0.88)):  # the reference, and sampled like the zero-shot
        rows.append(("mm", seed, "reference", "icu_mortality", "auroc", 0.90, 0.85, 0.95))
        rows.append(("mm", seed, "reference", "icu_mortality", "auroc_at_rollouts", sampled, None, None))
    md, records = tables_markdown(grid, _results(rows))
    assert "| mm | 0.820 ± 0.028 |" in md
    assert "| 0.900 ± 0.000 | 0.870 ± 0.014 | n/a |" in md  # no zero-shot - reference rows given
    assert "| ehr | 0.710 ± 0.014 |" in md
    assert "Modality knock-out" in md
    assert "| mm | icu_mortality | 0.820 ± 0.028 | 0.710 [0.660, 0.760] |" in md  # full beside the knock-out
    rec = next(r for r in records if r["run"] == "mm" and r["metric"] == "auroc")
    assert rec["mean"] == pytest.approx(0.82) and rec["values"] == [0.80, 0.84]

    grid.seeds = [0]
    one = _results([r for r in rows if r[1] == 0])
    md, _ = tables_markdown(grid, one)
    assert "| mm | 0.800 [0.750, 0.850] |" in md


def test_a_table_plot_shows_each_run_beside_its_reference(tmp_path):
    from mmehr.ablation_plots import plot_table, table_points

    rows = [
        ("ehr", s, "full", "icu_mortality", "auroc", v, v - 0.05, v + 0.05) for s, v in ((0, 0.70), (1, 0.74))
    ]
    rows += [("mm", 0, "full", "icu_mortality", "auroc", 0.80, 0.75, 0.85)]
    for seed, (ref, sampled) in enumerate(((0.79, 0.76), (0.81, float("nan")))):  # NaN: one class
        rows.append(("ehr", seed, "reference", "icu_mortality", "auroc", ref, None, None))
        rows.append(("ehr", seed, "reference", "icu_mortality", "auroc_at_rollouts", sampled, None, None))
    points = table_points("icu_mortality", ["ehr", "mm", "never_ran"], _results(rows))
    assert set(points) == {"ehr", "mm"}
    assert points["ehr"]["values"] == [0.70, 0.74]
    assert points["ehr"]["reference"] == pytest.approx(0.80) and points["ehr"]["sampled"] == pytest.approx(
        0.76
    )
    assert points["mm"]["reference"] is None and points["mm"]["sampled"] is None  # an older evaluation
    png = plot_table("T", "icu_mortality", ["ehr", "mm"], _results(rows), tmp_path / "t.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_a_table_without_a_task_is_written_and_plotted_for_every_task(tmp_path, monkeypatch):
    from mmehr import experiments

    grid = Grid(base="x", runs={"ehr": [], "mm": []}, tasks=["icu_mortality", "icu_admission"], seeds=[0])
    grid.tables = [TableSpec(title="Table 2", runs=["ehr", "mm"])]
    rows = [
        (run, 0, "full", task, "auroc", v, v - 0.05, v + 0.05)
        for run, v in (("ehr", 0.7), ("mm", 0.8))
        for task in grid.tasks
    ]
    monkeypatch.setattr(experiments, "collect", lambda grid, out: _results(rows))
    md = experiments.write_tables(grid, tmp_path).read_text()
    assert "### Table 2: icu_mortality" in md and "### Table 2: icu_admission" in md
    for task in grid.tasks:
        assert (tmp_path / "plots" / f"table1_{task}.png").stat().st_size > 0
        assert f"](plots/table1_{task}.png)" in md


def test_markdown_to_html_renders_tables_images_and_lists():
    html = markdown_to_html("# T\n\n- a `b`\n\n| x | y |\n|---|---|\n| 1 | 2 |\n\n![p](plots/p.png)\n")
    assert "<h1>T</h1>" in html
    assert "<li>a <code>b</code></li>" in html
    assert "<th>x</th>" in html and "<td>2</td>" in html
    assert '<img alt="p" src="plots/p.png">' in html


def test_report_says_which_planted_condition_the_predictions_follow(tmp_path):
    """Predictions that rise with the note condition only: AUROC 1 for it, 0.5 for the others."""
    rng = np.random.default_rng(0)
    n, hour = 40, 3_600_000_000
    symptom = np.arange(n) % 2 == 0
    truth = pl.DataFrame(
        {
            "subject_id": np.arange(n),
            "admit_us": np.full(n, 100 * hour),
            "end_us": np.full(n, 200 * hour),
            "af": np.arange(n) % 4 < 2,  # independent of symptom
            "opacity": np.arange(n) % 8 < 4,
            "symptom": symptom,
            "visible_risk": rng.normal(size=n),
        }
    )
    truth.write_parquet(tmp_path / "truth.parquet")
    ev = tmp_path / "run" / "eval" / "icu_admission"
    ev.mkdir(parents=True)
    pl.DataFrame(
        {
            "subject_id": np.arange(n),
            "prediction_time": pl.Series(np.full(n, 150 * hour)).cast(pl.Datetime("us")),
            "boolean_value": symptom,
            "predicted_boolean_value": symptom,
            "predicted_boolean_probability": np.where(symptom, 0.8, 0.1).astype(np.float32),
        }
    ).write_parquet(ev / "predictions.parquet")
    # the supervised references on the same samples: EHR ignores the symptom, EHR + notes follows it
    pl.DataFrame(
        {
            "subject_id": np.arange(n),
            "prediction_time": np.full(n, 150 * hour),
            "boolean_value": symptom,
            "p_ehr": np.full(n, 0.3, dtype=np.float32),
            "p_ehr+note": np.where(symptom, 0.9, 0.2).astype(np.float32),
        }
    ).write_parquet(ev / "reference.parquet")
    (ev.parent / "manifest.json").write_text(json.dumps({"sampler": {"n_rollouts": 20}}))
    lines = planted_signal({"run": ev.parent}, tmp_path / "truth.parquet")

    def cells(prefix):
        row = next(line for line in lines if line.startswith(prefix))
        return [c.strip() for c in row.strip("|").split("|")]

    assert cells("| run | icu_admission")[2:6] == ["40", "0.500", "0.500", "1.000"]
    # a reference's cell: its own AUROC; then the one its probabilities get when sampled from K = 20 futures
    ehr, note = cells("| reference (ehr) | icu_admission"), cells("| reference (ehr+note) | icu_admission")
    assert [c.split(";")[0] for c in ehr[2:6]] == ["40", "0.500", "0.500", "0.500"]
    assert [c.split(";")[0] for c in note[2:6]] == ["40", "0.500", "0.500", "1.000"]
    sampled = {name: float(row[5].split("; ")[1]) for name, row in (("ehr", ehr), ("note", note))}
    assert sampled["note"] > 0.98  # 0.9 against 0.2: 20 draws almost never cross
    assert abs(sampled["ehr"] - 0.5) < 0.05  # a constant 0.3 sampled is noise: chance, on average


def test_the_report_warns_of_rollout_endings_the_data_never_has(tmp_path):
    from mmehr.report import comparison

    real = {"ICU_DISCHARGE": 0.6, "MEDS_DEATH": 0.4}
    ends = {
        "all_three": {
            "stop: ICU_DISCHARGE": 0.5,
            "outcome: MEDS_DEATH": 0.3,
            "stop: DISCHARGE_LOCATION//HOME": 0.2,
        },
        "ehr_only": {
            "stop: ICU_DISCHARGE": 0.55,
            "outcome: MEDS_DEATH": 0.44,
            "stop: DISCHARGE_LOCATION//HOME": 0.01,
        },
    }
    evals = {}
    for name, rollouts in ends.items():
        task = tmp_path / name / "eval" / "icu_mortality"
        task.mkdir(parents=True)
        metrics = {
            "n_samples": 120,
            "n_positive": 48,
            "metrics": {},
            "ends": {"rollouts": rollouts, "real": real, "samples": 120},
        }
        (task / "metrics.json").write_text(json.dumps(metrics))
        evals[name] = task.parent
    warnings = [line for line in comparison(evals, tmp_path, tmp_path / "plots") if "Warning" in line]
    assert len(warnings) == 1  # ehr_only's 1 % of 120 samples predicts 1.2 such real endings: not flagged
    assert (
        "20% of all_three's rollouts end on DISCHARGE_LOCATION//HOME, which no real timeline" in warnings[0]
    )


def test_paired_comparisons_pool_the_seeds_on_the_same_samples(tmp_path):
    from mmehr.ablation_tables import comparisons_markdown
    from mmehr.experiments import compare_runs

    rng = np.random.default_rng(1)
    n = 300
    y = rng.random(n) < 0.3
    keys = {"subject_id": np.arange(n) // 2, "prediction_time": np.arange(n) * 1_000_000}
    for run, noise in (("better", 0.7), ("worse", 2.0)):
        for seed in (0, 1):
            d = tmp_path / "runs" / run / f"seed{seed}" / "eval" / "t"
            d.mkdir(parents=True)
            p = (y + rng.normal(0, noise, n)).astype(np.float32)
            pl.DataFrame({**keys, "boolean_value": y, "predicted_boolean_probability": p}).with_columns(
                pl.col("prediction_time").cast(pl.Datetime("us"))
            ).write_parquet(d / "predictions.parquet")
    grid = Grid(
        base="x", runs={"better": [], "worse": []}, tasks=["t"], seeds=[0, 1], compare=[["better", "worse"]]
    )
    (record,) = compare_runs(grid, tmp_path)
    assert (record["a"], record["b"], record["task"], record["seeds"]) == ("better", "worse", "t", 2)
    assert 0 < record["lo"] < record["value"] < record["hi"]
    assert "(CI above 0)" in comparisons_markdown([record])

    # benchmarks/compare_runs.py: the same difference between runs of different grids' directories
    import shutil
    import subprocess
    import sys

    shutil.move(tmp_path / "runs" / "better", tmp_path / "other_grid_better")
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "compare_runs.py"
    args = [
        sys.executable,
        str(script),
        str(tmp_path / "other_grid_better"),
        str(tmp_path / "runs" / "worse"),
    ]
    out = subprocess.run(
        [*args, "--seeds", "0", "1", "--task", "t"], capture_output=True, text=True, check=True
    )
    expected = f"{record['value']:+.3f} [{record['lo']:+.3f}, {record['hi']:+.3f}]"
    assert f"| other_grid_better | worse | t | 2 | {expected} |" in out.stdout

    # runs scored on other samples are refused, not compared
    from mmehr.ablation_tables import paired_difference

    shifted = tmp_path / "shifted" / "t"
    shifted.mkdir(parents=True)
    pl.read_parquet(
        tmp_path / "runs" / "worse" / "seed1" / "eval" / "t" / "predictions.parquet"
    ).with_columns(pl.col("subject_id") + 1000).write_parquet(shifted / "predictions.parquet")
    evals = [
        (tmp_path / "other_grid_better" / "seed0" / "eval", tmp_path / "runs" / "worse" / "seed0" / "eval")
    ]
    with pytest.raises(ValueError, match="other samples"):
        paired_difference(
            [*evals, (tmp_path / "other_grid_better" / "seed1" / "eval", tmp_path / "shifted")], "t"
        )


def test_an_interrupted_training_run_is_resumed_not_refused(tmp_path, monkeypatch):
    """A grid rerun after a kill continues the run's own half-written training (`--resume`: from its
    latest intact checkpoint, or step 0) instead of failing on "already holds a training run"."""
    from mmehr import experiments

    calls = []
    monkeypatch.setattr(experiments, "run_stage", lambda *args, **kw: calls.append(args))
    grid = Grid(base="base.yaml", runs={"a": []}, tasks=["icu_mortality"])
    experiments.train_and_evaluate(grid, tmp_path / "base.yaml", tmp_path, "a", 0)
    assert calls[0][0] == "train" and "--resume" not in calls[0]  # a fresh run starts fresh
    calls.clear()
    (experiments.run_dir(tmp_path, "a", 0) / "train").mkdir(parents=True)  # left by a killed run
    experiments.train_and_evaluate(grid, tmp_path / "base.yaml", tmp_path, "a", 0)
    assert calls[0][0] == "train" and "--resume" in calls[0]


def test_a_run_started_from_another_runs_model_gets_its_seeds_directory_and_waits_for_it(
    tmp_path, monkeypatch
):
    """`{run:NAME}` is the named run's training directory at the same seed, `{seed}` the seed; such a run is
    trained after every run it names (also with parallel jobs), and a grid naming an unknown run fails."""
    from mmehr import experiments

    base = tmp_path / "base.yaml"
    base.write_text("data: {}\n")
    grid_path = tmp_path / "g.yaml"
    grid_path.write_text(
        "base: base.yaml\nseeds: [0, 1]\nruns:\n"
        "  warm: ['train.init_from={run:cold}', 'run.out=x{seed}']\n  cold: []\n"
        "tables: [{title: T, runs: [cold, warm]}]\n"
    )
    calls = []

    def fake_stage(*args, **kw):
        calls.append(args)
        if args[0] == "train":  # stands in for a finished training run
            out = Path(args[args.index("--out") + 1])
            out.mkdir(parents=True, exist_ok=True)
            (out / "manifest.json").write_text('{"stage": "train"}')

    monkeypatch.setattr(experiments, "run_stage", fake_stage)
    monkeypatch.setattr(experiments, "is_complete", lambda d: (Path(d) / "manifest.json").is_file())
    monkeypatch.setattr(experiments, "write_tables", lambda grid, out: out / "tables.md")
    monkeypatch.setattr(experiments, "stale_runs", lambda grid, base, out: [])  # stand-ins have no config
    for jobs in (1, 2):
        calls.clear()
        out = tmp_path / f"out{jobs}"
        experiments.ablate(grid_path, out, jobs=jobs)
        trains = [c for c in calls if c[0] == "train"]
        order = [Path(c[c.index("--out") + 1]).parent.parent.name for c in trains]
        assert order[:2] == ["cold", "cold"] and order[2:] == ["warm", "warm"]
        for c in trains[2:]:
            seed = Path(c[c.index("--out") + 1]).parent.name  # seed0 / seed1
            sets = [c[i + 1] for i, a in enumerate(c) if a == "--set"]
            assert f"train.init_from={(out / 'runs' / 'cold' / seed / 'train').resolve()}" in sets
            assert f"run.out=x{seed[-1]}" in sets
    with pytest.raises(ValueError, match=r"cold seed 0"):  # --only warm, with no cold model to start from
        experiments.ablate(grid_path, tmp_path / "out3", only=["warm"])
    experiments.ablate(grid_path, tmp_path / "out1", only=["warm"])  # cold is trained there: fine
    grid_path.write_text("base: base.yaml\nruns:\n  warm: ['train.init_from={run:nope}']\n")
    with pytest.raises(ValueError, match=r"\{run:nope\}"):
        load_grid(grid_path)


def test_a_grid_refuses_complete_runs_that_its_config_no_longer_makes(tmp_path, demo_timelines, monkeypatch):
    """A grid reuses its complete runs and tables all of them: a run trained before its base config or
    overrides changed, or evaluated without a task or with other rollouts, is refused before anything
    trains, naming the run and what differs; the runs the grid makes now pass."""
    from mmehr import experiments
    from mmehr.config import save_config
    from mmehr.io import mark_output, write_json
    from mmehr.runconfig import load_train_config

    base = tmp_path / "base.yaml"
    base.write_text(f"data: {{timelines: {demo_timelines}}}\noptim: {{lr: 1.0e-3}}\n")
    grid_path = tmp_path / "g.yaml"
    grid_path.write_text(
        "base: base.yaml\nrollouts: 20\ntasks: [icu_mortality]\nruns:\n  a: []\n  b: [model.n_layer=3]\n"
    )
    grid, base = load_grid(grid_path)
    out = mark_output(tmp_path / "out", "ablate")
    for run in ("a", "b"):  # what a finished grid leaves: the config the training saved, then a manifest
        train = experiments.run_dir(out, run, 0) / "train"
        train.mkdir(parents=True)
        save_config(
            load_train_config(base, experiments.run_overrides(grid, out, run, 0)), train / "config.yaml"
        )
        write_json(train / "manifest.json", {"stage": "train"})
    evaluation = experiments.run_dir(out, "a", 0) / "eval"
    evaluation.mkdir()
    write_json(evaluation / "manifest.json", {"tasks": ["icu_mortality"], "sampler": {"n_rollouts": 20}})
    assert experiments.stale_runs(grid, base, out) == []

    base.write_text(base.read_text().replace("1.0e-3", "2.0e-3"))  # the base config changed since
    write_json(evaluation / "manifest.json", {"tasks": ["icu_mortality"], "sampler": {"n_rollouts": 10}})
    stale = experiments.stale_runs(grid, base, out)
    assert stale == [
        "runs/a/seed0/train (trained with other optim.lr)",
        "runs/a/seed0/eval (rollouts 10 -> 20)",
        "runs/b/seed0/train (trained with other optim.lr)",
    ]
    trained = []
    monkeypatch.setattr(experiments, "run_stage", lambda *args, **kw: trained.append(args))
    with pytest.raises(ValueError, match=r"runs/a/seed0/train \(trained with other optim.lr\).*Move"):
        experiments.ablate(grid_path, out)
    assert trained == []  # refused before anything ran

    base.write_text(base.read_text().replace("2.0e-3", "1.0e-3"))
    grid_path.write_text(grid_path.read_text().replace("[icu_mortality]", "[icu_mortality, icu_admission]"))
    grid, base = load_grid(grid_path)
    assert experiments.stale_runs(grid, base, out) == [
        "runs/a/seed0/eval (no icu_admission; rollouts 10 -> 20)"
    ]

    # Every setting the evaluation's manifest records is held to the grid's: here the samples, the safety
    # cap and the context the grid's evaluate_args now ask for.
    recorded = {"tasks": ["icu_mortality", "icu_admission"], "sampler": {"n_rollouts": 20, "max_new_tokens": 8192},
                "context_tokens": 1792, "max_samples": None, "tuning_samples": None}  # fmt: skip
    write_json(evaluation / "manifest.json", recorded)
    assert experiments.stale_runs(grid, base, out) == []  # the defaults (block_size 2048: context 1792)
    grid_path.write_text(
        grid_path.read_text()
        + "max_samples: 200\nevaluate_args: [--max-new-tokens, '512', --context-tokens, '192']\n"
    )
    grid, base = load_grid(grid_path)
    assert experiments.stale_runs(grid, base, out) == [
        "runs/a/seed0/eval (max-new-tokens 8192 -> 512; context-tokens 1792 -> 192; max-samples None -> 200)"
    ]


def test_the_last_running_job_evaluates_on_every_core_but_trains_on_its_share():
    from mmehr.experiments import CoreShare

    share = CoreShare(cores=4, jobs=2)
    seen = {}
    share.run(lambda: share.run(lambda: seen.setdefault("two running", share.eval_threads())))
    share.run(lambda: seen.setdefault("one running", share.eval_threads()))
    assert seen == {"two running": 2, "one running": 4}
    assert share.train_threads == 2  # training never changes its thread count


@pytest.mark.parametrize(
    "grid_path", sorted((Path(__file__).resolve().parents[1] / "configs" / "grids").glob("*.yaml")), ids=str
)
def test_every_committed_grid_loads_and_each_run_names_real_config_keys(grid_path):
    """A grid's overrides are applied only when a run starts (maybe an hour in): a misspelt key must fail
    here instead. Paths and the encoders' widths, filled from the data at run time, are stand-ins."""
    from mmehr.config import apply_overrides, from_dict, load_yaml
    from mmehr.experiments import RUN_REF
    from mmehr.runconfig import TrainConfig

    grid, base = load_grid(grid_path)
    for run, overrides in grid.runs.items():
        raw = load_yaml(base)
        apply_overrides(
            raw, [RUN_REF.sub("runs/x", o).replace("{out}", "out") for o in [*grid.set, *overrides]]
        )
        for modality in raw.get("model", {}).get("fusion", {}).get("modalities", {}).values():
            modality.setdefault("d_enc", 8)
        from_dict(TrainConfig, raw, where=f"{grid_path.name}: {run}")

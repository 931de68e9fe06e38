"""The paper's experiments as one command: `mmehr ablate --grid FILE --out DIR`.

A grid file (YAML) lists runs, each a set of training-config overrides (modalities, encoder per modality,
compression method, k, l, ...), and the tables to build from them:

    base: ../demo.yaml                 # training config, relative to the grid file
    tasks: [icu_mortality, hospital_mortality]
    rollouts: 20
    max_samples: 200                   # per task and split (null: all)
    seeds: [0, 1]
    set: ["optim.max_steps=600"]       # overrides for every run
    runs:
      ehr_only: [data.modalities.ecg.enabled=false, data.modalities.cxr.enabled=false,
                 data.modalities.note.enabled=false]
      notes: [...]
    knockout: [all_three]              # runs also evaluated with each modality hidden
    compare: [[notes, ehr_only]]       # paired AUROC differences, pooled over seeds
    tables:
      - {title: "Table 2: modalities", runs: [ehr_only, notes], task: icu_mortality}  # no task: every task

Each (run, seed) is trained (`mmehr train`) and evaluated (`mmehr evaluate`) in its own directory under
DIR/runs/<run>/seed<k>/; a run whose outputs are complete is skipped, so an interrupted grid resumes.
In a run's overrides `{seed}` is the seed, and `{run:NAME}` the training directory of the grid's run NAME
at the same seed (e.g. `train.init_from={run:ehr_only}`: a multimodal run started from that seed's
EHR-only model); such a run waits until every run it names is done.
Results: DIR/results.parquet (one row per run, seed, variant, task, metric), DIR/tables.md and
DIR/tables.json (per table: mean over seeds, spread, and the bootstrap CI of each seed; beside each run the
supervised reference that sees what it sees, `mmehr.evaluate.reference`), the paired comparisons, one plot
per table and task. `--jobs N` trains and evaluates N (run, seed) pairs at once, the cores split between them.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from mmehr.ablation_plots import plot_table, select
from mmehr.ablation_tables import comparisons_markdown, paired_difference, read_metrics
from mmehr.checkpoint import load_config_of
from mmehr.config import from_dict, load_yaml, to_dict
from mmehr.evaluate import cli as evaluate_cli
from mmehr.io import (
    OutputLock,
    atomic_path,
    check_output,
    is_complete,
    mark_output,
    read_manifest,
    write_json,
)
from mmehr.runconfig import TrainConfig, config_differences, load_train_config

TABLE_METRICS = ("auroc", "auprc", "f1_macro", "f1_pos")


@dataclass
class TableSpec:
    title: str
    runs: list[str]
    task: str | None = None  # None: every task of the grid

    def tasks(self, grid_tasks: list[str]) -> list[str]:
        """The tasks this table is written (and plotted) for."""
        return [self.task] if self.task else grid_tasks


@dataclass
class Grid:
    base: str
    runs: dict[str, list[str]]
    tasks: list[str] = field(default_factory=lambda: ["icu_mortality"])
    rollouts: int = 20
    max_samples: int | None = None
    seeds: list[int] = field(default_factory=lambda: [0])
    set: list[str] = field(default_factory=list)
    knockout: list[str] = field(default_factory=list)
    tables: list[TableSpec] = field(default_factory=list)
    compare: list[list[str]] = field(default_factory=list)  # [run_a, run_b]: AUROC(a) - AUROC(b), paired
    evaluate_args: list[str] = field(default_factory=list)


def load_grid(path: str | Path) -> tuple[Grid, Path]:
    path = Path(path)
    grid = from_dict(Grid, load_yaml(path), where=str(path))
    base = (path.parent / grid.base).resolve()
    if not base.is_file():
        raise FileNotFoundError(f"{path}: base config {base} does not exist")
    for t in grid.tables:
        missing = [r for r in t.runs if r not in grid.runs]
        if missing:
            raise ValueError(f"{path}: table {t.title!r} names runs {missing} that the grid does not define")
    unknown = [r for r in grid.knockout if r not in grid.runs]
    unknown += [r for pair in grid.compare for r in pair if r not in grid.runs]
    if unknown:
        raise ValueError(f"{path}: knockout or compare names unknown runs {unknown}")
    if any(len(pair) != 2 for pair in grid.compare):
        raise ValueError(f"{path}: each compare entry is a pair [run_a, run_b]")
    for run in grid.runs:
        for dep in depends_on(grid, run):
            if dep not in grid.runs or depends_on(grid, dep):
                raise ValueError(
                    f"{path}: run {run!r} names {{run:{dep}}}, which is not a run of the grid, or names "
                    "runs of its own (one level only)"
                )
    return grid, base


RUN_REF = re.compile(r"\{run:([A-Za-z0-9_.-]+)\}")


def depends_on(grid: Grid, run: str) -> list[str]:
    """The runs whose training directories `run`'s overrides name with {run:NAME}."""
    return sorted({m for o in grid.runs[run] for m in RUN_REF.findall(o)})


def run_overrides(grid: Grid, out: Path, run: str, seed: int) -> list[str]:
    """The grid's and the run's overrides for one seed: {seed} and {run:NAME} filled in."""
    filled = [
        RUN_REF.sub(lambda m: str(run_dir(out, m.group(1), seed).resolve() / "train"), o).replace(
            "{seed}", str(seed)
        )
        for o in grid.runs[run]
    ]
    return [*grid.set, *filled, f"run.seed={seed}"]


def stale_runs(grid: Grid, base: Path, out: Path) -> list[str]:
    """The grid's complete (run, seed) outputs in `out` that the grid would not make now: a training run
    whose config differs from the base config with the run's overrides (a base config or an override changed
    since), or an evaluation without a task the grid asks for or run with other settings (rollouts, samples,
    the safety cap, context, ...: `evaluation_differences`). A grid reuses complete outputs and tables every
    complete run, so each must be this grid's."""
    stale = []
    for run in grid.runs:
        for seed in grid.seeds:
            d = run_dir(out, run, seed)
            train_dir, eval_dir = d / "train", d / "eval"
            name = str(d.relative_to(out))
            trained, evaluated = is_complete(train_dir), is_complete(eval_dir)
            if not (trained or evaluated):
                continue
            config = load_train_config(base, run_overrides(grid, out, run, seed))  # what the grid makes now
            if trained:
                diff = config_differences(to_dict(load_config_of(train_dir)), to_dict(config))
                if diff:
                    stale.append(f"{name}/train (trained with other {', '.join(diff)})")
            if evaluated:
                args = evaluate_arguments(grid, run, train_dir)
                diff = evaluation_differences(read_manifest(eval_dir), args, config)
                if diff:
                    stale.append(f"{name}/eval ({'; '.join(diff)})")
    return stale


def run_stage(*args: str, threads: int | None = None, log: Path | None = None) -> None:
    """Run one `mmehr` stage in a child process: its output goes to the terminal, or to `log` (appended);
    `threads` sets its torch threads (OMP_NUM_THREADS)."""
    cmd = [sys.executable, "-m", "mmehr.cli", *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    if log is None:
        print("$ mmehr " + " ".join(args), flush=True)
        result = subprocess.run(cmd, env=env)
    else:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a") as f:
            f.write("$ mmehr " + " ".join(args) + "\n")
            f.flush()
            result = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        where = f" (its output: {log})" if log else ""
        raise RuntimeError(f"`mmehr {' '.join(args)}` failed with exit code {result.returncode}{where}")


def run_dir(out: Path, run: str, seed: int) -> Path:
    return out / "runs" / run / f"seed{seed}"


class CoreShare:
    """The cores a grid's parallel jobs share. Training always gets cores // jobs threads: a run trained on
    another thread count is another run (the floating-point sums differ). An evaluation gets the cores //
    (jobs running when it starts): the last job evaluates on all the cores; sampled rollouts do not depend
    on the thread count (tests/test_rollout.py: the same rollouts on 1 and 2 threads)."""

    def __init__(self, cores: int, jobs: int):
        self.cores, self.train_threads = cores, max(1, cores // jobs)
        self._running, self._lock = 0, threading.Lock()

    def run(self, job: Callable[[], Path]) -> Path:
        with self._lock:
            self._running += 1
        try:
            return job()
        finally:
            with self._lock:
                self._running -= 1

    def eval_threads(self) -> int:
        with self._lock:
            return max(1, self.cores // max(1, self._running))


def train_and_evaluate(
    grid: Grid,
    base: Path,
    out: Path,
    run: str,
    seed: int,
    *,
    threads: int | None = None,
    eval_threads: Callable[[], int] | None = None,
    quiet: bool = False,
) -> Path:
    """Train and evaluate one (run, seed) unless its outputs are complete; returns its directory. `quiet`
    sends the stages' output to <run>/seed<k>/log.txt (parallel jobs). `threads`: torch threads of both
    stages; `eval_threads`, when given, says the evaluation's as it starts."""
    d = run_dir(out, run, seed)
    log = d / "log.txt" if quiet else None
    extra = ["--no-progress"] if quiet else []
    train_dir, eval_dir = d / "train", d / "eval"
    if not is_complete(train_dir):
        overrides = run_overrides(grid, out, run, seed)
        run_stage(
            "train",
            "--config",
            str(base),
            "--out",
            str(train_dir),
            *[a for o in overrides for a in ("--set", o)],
            *(["--resume"] if train_dir.exists() else []),  # an interrupted run continues from its checkpoint
            *extra,
            threads=threads,
            log=log,
        )
    if not is_complete(eval_dir):
        threads = eval_threads() if eval_threads else threads
        args = evaluate_arguments(grid, run, train_dir)
        run_stage(*args, "--out", str(eval_dir), *extra, threads=threads, log=log)
    return d


def evaluate_arguments(grid: Grid, run: str, train_dir: Path) -> list[str]:
    """The `mmehr evaluate` arguments of one run's evaluation (without --out and the progress flag)."""
    args = [
        "evaluate",
        "--checkpoint",
        str(train_dir),
        "--task",
        *grid.tasks,
        "--rollouts",
        str(grid.rollouts),
    ]
    if grid.max_samples is not None:
        args += ["--max-samples", str(grid.max_samples)]
    if run in grid.knockout:
        args += ["--knockout"]  # every enabled modality hidden in turn, same checkpoint
    return args + list(grid.evaluate_args)


def evaluation_differences(manifest: dict, args: list[str], config: TrainConfig) -> list[str]:
    """What a complete evaluation's manifest records otherwise than `mmehr evaluate` with `args` would run
    it (config: the run's training config): "no TASK" for a task it lacks, "setting saved -> wanted" for
    each differing setting. A setting the manifest does not record (written before it was) is not checked."""
    parser = argparse.ArgumentParser(add_help=False)
    evaluate_cli.add_arguments(parser)
    a = parser.parse_args([*args[1:], "--out", "unused"])
    sampler = manifest.get("sampler", {})
    recorded = {
        "rollouts": (sampler, "n_rollouts", a.rollouts),
        "max-new-tokens": (sampler, "max_new_tokens", a.max_new_tokens),
        "temperature": (sampler, "temperature", a.temperature),
        "seed": (sampler, "seed", a.seed),
        "max-simulated-days": (sampler, "max_simulated_days", a.max_simulated_days),
        "context-tokens": (
            manifest,
            "context_tokens",
            a.context_tokens or evaluate_cli.default_context_tokens(config.model.block_size),
        ),
        "split": (manifest, "split", a.split),
        "threshold-from": (manifest, "threshold_from", a.threshold_from),
        "hide-modality": (manifest, "hidden_modalities", list(a.hide_modality)),
        "max-samples": (manifest, "max_samples", a.max_samples),
        "tuning-samples": (manifest, "tuning_samples", a.tuning_samples),
        "bootstrap": (manifest, "bootstrap", a.bootstrap),
        "reference": (manifest, "reference", not a.no_reference),
        "knockout": (manifest, "knockout", bool(a.knockout is not None and config.model.modalities)),
    }
    differ = []
    for name, (record, key, wanted) in recorded.items():
        if key not in record:
            continue
        saved = bool(record[key]) if name == "knockout" else record[key]
        if saved != wanted:
            differ.append(f"{name} {saved} -> {wanted}")
    missing = [t for t in a.task if t not in manifest.get("tasks", [])]
    return ([f"no {', '.join(missing)}"] if missing else []) + differ


def collect(grid: Grid, out: Path) -> pl.DataFrame:
    """One row per (run, seed, variant, task, metric) from finished evaluations."""
    rows = []
    for run in grid.runs:
        for seed in grid.seeds:
            eval_dir = run_dir(out, run, seed) / "eval"
            if not is_complete(eval_dir):
                continue
            for task in grid.tasks:
                for variant, metrics in read_metrics(eval_dir, task).items():
                    for metric, v in metrics.items():
                        value = v.get("value")
                        rows.append((run, seed, variant, task, metric, value, v.get("lo"), v.get("hi")))
    schema = {
        "run": pl.String,
        "seed": pl.Int64,
        "variant": pl.String,
        "task": pl.String,
        "metric": pl.String,
        "value": pl.Float64,
        "lo": pl.Float64,
        "hi": pl.Float64,
    }
    return pl.DataFrame(rows, schema=schema, orient="row")


def _cell(values: pl.DataFrame, signed: bool = False) -> str:
    """mean ± sd over seeds, and the CI when there is one seed."""
    v = values["value"].to_numpy().astype(float) if values.height else np.zeros(0)
    v = v[~np.isnan(v)]
    f = "+.3f" if signed else ".3f"
    if v.size == 0:
        return "n/a"
    if v.size == 1:
        lo, hi = values["lo"][0], values["hi"][0]
        ci = f" [{lo:{f}}, {hi:{f}}]" if lo is not None and not np.isnan(lo) else ""
        return f"{v[0]:{f}}{ci}"
    return f"{v.mean():{f}} ± {v.std(ddof=1):.3f}"


def tables_markdown(grid: Grid, results: pl.DataFrame) -> tuple[str, list[dict]]:
    """The paper's table layout: one row per run, AUROC / AUPRC / F1 (macro) / F1 (positive)."""
    parts, records = [], []
    specs = grid.tables or [TableSpec(title="All runs", runs=list(grid.runs))]
    for spec in specs:
        for task in spec.tasks(grid.tasks):
            n_seeds = len(grid.seeds)
            note = f"mean ± sd over {n_seeds} seeds" if n_seeds > 1 else "value [95% bootstrap CI]"
            parts.append(f"### {spec.title}: {task}\n\n{note}; the reference is the supervised logistic")
            parts.append("regression that sees what the run sees, on the same samples (`mmehr evaluate`);")
            parts.append("sampled: its AUROC had its probabilities been estimated from as many rollouts.\n")
            parts.append(
                "| run | AUROC | AUPRC | F1 (macro) | F1 (positive) | reference AUROC | reference, sampled "
                "| zero-shot - reference |"
            )
            parts.append("|---|---|---|---|---|---|---|---|")
            for run in spec.runs:
                cells = []
                for metric in TABLE_METRICS:
                    sel = select(results, run=run, task=task, variant="full", metric=metric)
                    cells.append(_cell(sel))
                    if sel.height:
                        vals = sel["value"].to_numpy()
                        records.append(
                            {
                                "table": spec.title,
                                "task": task,
                                "run": run,
                                "metric": metric,
                                "mean": float(np.nanmean(vals)),
                                "sd": float(np.nanstd(vals, ddof=1)) if vals.size > 1 else None,
                                "values": vals.tolist(),
                            }
                        )
                for metric in ("auroc", "auroc_at_rollouts", "zero_shot_minus_reference"):
                    ref = select(results, run=run, task=task, variant="reference", metric=metric)
                    cells.append(_cell(ref, signed=metric == "zero_shot_minus_reference"))
                parts.append(f"| {run} | " + " | ".join(cells) + " |")
            parts.append("")
    knock = results.filter(pl.col("variant").str.starts_with("without_") & (pl.col("metric") == "auroc"))
    if knock.height:
        parts.append("### Modality knock-out (AUROC; the same checkpoint with one modality hidden)\n")
        parts.append("| run | task | full | " + " | ".join(sorted(set(knock["variant"]))) + " |")
        parts.append("|---|---|---|" + "---|" * len(set(knock["variant"])))
        for (run, task), _ in knock.group_by(["run", "task"], maintain_order=True):
            cells = [_cell(select(results, run=run, task=task, variant="full", metric="auroc"))]
            for variant in sorted(set(knock["variant"])):
                cells.append(_cell(select(knock, run=run, task=task, variant=variant)))
            parts.append(f"| {run} | {task} | " + " | ".join(cells) + " |")
        parts.append("")
    return "\n".join(parts), records


def compare_runs(grid: Grid, out: Path) -> list[dict]:
    """Per compare pair and task: AUROC(a) - AUROC(b) on the same samples, mean over the seeds both
    finished, with the seed-pooled subject-bootstrap CI."""
    records = []
    for a, b in grid.compare:
        evals = [(run_dir(out, a, seed) / "eval", run_dir(out, b, seed) / "eval") for seed in grid.seeds]
        for task in grid.tasks:
            d = paired_difference(evals, task)
            if d is not None:
                records.append({"a": a, "b": b, "task": task, **d})
    return records


def write_tables(grid: Grid, out: Path) -> Path:
    results = collect(grid, out)
    with atomic_path(out / "results.parquet") as tmp:
        results.write_parquet(tmp)
    md, records = tables_markdown(grid, results)
    for i, spec in enumerate(grid.tables):
        for task in spec.tasks(grid.tasks):  # one plot per table and task, as the tables
            png = plot_table(spec.title, task, spec.runs, results, out / "plots" / f"table{i + 1}_{task}.png")
            md += f"\n![{spec.title}: {task}](plots/{png.name})\n"
    comparisons = compare_runs(grid, out)
    md += "\n" + comparisons_markdown(comparisons)
    with atomic_path(out / "tables.md") as tmp:
        tmp.write_text(md)
    write_json(out / "tables.json", {"tables": records, "comparisons": comparisons})
    return out / "tables.md"


def ablate(grid_path: str | Path, out: str | Path, only: list[str] | None = None, jobs: int = 1) -> Path:
    """Train and evaluate every (run, seed) of the grid (resuming finished ones), then write the tables.
    With jobs > 1, that many pairs run at once, each with cores // jobs torch threads (`CoreShare`)."""
    grid, base = load_grid(grid_path)
    out = Path(out)
    check_output(out, "ablate", inputs=[grid_path, base])
    mark_output(out, "ablate")
    with OutputLock(out, "ablate"):  # a second grid run into `out` fails, naming this one
        return _ablate(grid, base, grid_path, out, only, jobs)


def _ablate(
    grid: Grid, base: Path, grid_path: str | Path, out: Path, only: list[str] | None, jobs: int
) -> Path:
    todo = [(r, s) for s in grid.seeds for r in grid.runs if not only or r in only]
    picked = set(todo)
    deps = {r: depends_on(grid, r) for r in grid.runs}
    missing = sorted(
        f"{d} seed {s}"
        for r, s in todo
        for d in deps[r]
        if (d, s) not in picked and not is_complete(run_dir(out, d, s) / "train")
    )
    if missing:
        raise ValueError(f"the picked runs start from runs not picked and not trained yet: {missing}")
    stale = stale_runs(grid, base, out)
    if stale:
        raise ValueError(
            f"{out} holds complete runs that {grid_path} does not make now (its base config {base} or their "
            f"overrides changed since), so their results would not be this grid's: {'; '.join(stale)}. Move "
            "those run directories out of it (mmehr does not delete them) or choose another --out."
        )
    # Runs that start from another run's model go second, when every run they name is done.
    phases = [[rs for rs in todo if not deps[rs[0]]], [rs for rs in todo if deps[rs[0]]]]
    t0, done = time.perf_counter(), 0
    if jobs <= 1:
        for i, (run, seed) in enumerate(phases[0] + phases[1], 1):
            print(f"[ablate {i}/{len(todo)}] {run} seed {seed}", flush=True)
            train_and_evaluate(grid, base, out, run, seed)
    else:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        share = CoreShare(cores, jobs)
        print(
            f"[ablate] {len(todo)} runs, {jobs} at a time with {share.train_threads} thread(s) each (an "
            "evaluation that starts with fewer jobs running gets their cores); logs in runs/*/seed*/log.txt",
            flush=True,
        )

        def job(run: str, seed: int) -> Path:
            return share.run(
                lambda: train_and_evaluate(
                    grid,
                    base,
                    out,
                    run,
                    seed,
                    threads=share.train_threads,
                    eval_threads=share.eval_threads,
                    quiet=True,
                )
            )

        for phase in phases:
            with ThreadPoolExecutor(max_workers=jobs) as pool:
                futures = {pool.submit(job, run, seed): (run, seed) for run, seed in phase}
                for future in as_completed(futures):
                    run, seed = futures[future]
                    future.result()  # a failed run stops the grid with its error (and names its log)
                    done += 1
                    print(
                        f"[ablate {done}/{len(todo)}] {run} seed {seed} done ({time.perf_counter() - t0:.0f} s)",
                        flush=True,
                    )
    tables = write_tables(grid, out)
    write_json(
        out / "manifest.json",
        {
            "stage": "ablate",
            "grid": str(Path(grid_path).resolve()),
            "runs": len(todo),
            "seconds": time.perf_counter() - t0,
        },
    )
    return tables


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--grid", required=True, help="grid YAML (see configs/grids/)")
    parser.add_argument("--out", required=True, help="output directory (rerun to resume)")
    parser.add_argument("--only", nargs="*", help="run only these runs of the grid")
    parser.add_argument(
        "--jobs", type=int, default=1, help="(run, seed) pairs trained and evaluated at once (default 1)"
    )


def run(args: argparse.Namespace) -> int:
    tables = ablate(args.grid, args.out, args.only, jobs=args.jobs)
    print(tables.read_text())
    print(f"wrote {tables}")
    return 0

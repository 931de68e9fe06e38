"""The ablation tables' plots: each run's zero-shot AUROC over seeds beside its supervised reference.

`mmehr ablate` (`mmehr.experiments.write_tables`) draws one per table and task from its results frame
(one row per run, seed, variant, task and metric).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl


def select(results: pl.DataFrame, **columns: str) -> pl.DataFrame:
    """The rows of a grid's results (run, seed, task, variant, metric, value, lo, hi) whose named columns
    hold the given values, e.g. `select(results, run="ehr_only", task="icu_mortality", metric="auroc")`."""
    return results.filter(pl.all_horizontal(pl.col(c) == v for c, v in columns.items()))


def table_points(task: str, runs: list[str], results: pl.DataFrame) -> dict[str, dict]:
    """What a table's plot shows per run: the zero-shot AUROC of each seed ("values", with the "lo" / "hi"
    of its bootstrap CI), and the mean over seeds of the run's supervised reference ("reference") and of
    that reference sampled like the zero-shot ("sampled"); None where there is none. Runs without a
    finished evaluation are left out."""

    def mean(run: str, variant: str, metric: str) -> float | None:
        v = select(results, run=run, variant=variant, task=task, metric=metric)["value"].to_numpy()
        v = v[~np.isnan(v.astype(float))] if v.size else v
        return float(v.mean()) if v.size else None

    points = {}
    for run in runs:
        r = select(results, run=run, variant="full", task=task, metric="auroc")
        if not r.height:
            continue
        points[run] = {
            "values": r["value"].to_list(),
            "lo": r["lo"].to_list(),
            "hi": r["hi"].to_list(),
            "reference": mean(run, "reference", "auroc"),
            "sampled": mean(run, "reference", "auroc_at_rollouts"),
        }
    return points


def plot_table(title: str, task: str, runs: list[str], results: pl.DataFrame, out_png: Path) -> Path:
    """AUROC per run (one dot per seed, bar = mean, whisker = bootstrap CI of a single seed) beside its
    supervised reference (solid mark) and that reference sampled like the zero-shot (dashed mark)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = table_points(task, runs, results)
    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(runs)), 3.6))
    labelled, bar_label = set(), "zero-shot"

    def mark(x: float, y: float | None, label: str, **style) -> None:
        if y is not None:
            ax.hlines(y, x - 0.36, x + 0.36, label=None if label in labelled else label, zorder=4, **style)
            labelled.add(label)

    for x, run in enumerate(runs):
        if run not in points:
            continue
        p = points[run]
        vals = np.array(p["values"], dtype=float)
        ax.bar(x, np.nanmean(vals), color="#8fb3d9", width=0.6, label=bar_label)
        bar_label = None
        ax.scatter(np.full(vals.size, x), vals, color="#1f4e79", zorder=3, s=14)
        if vals.size == 1 and p["lo"][0] is not None:
            ax.errorbar(
                x, vals[0], yerr=[[vals[0] - p["lo"][0]], [p["hi"][0] - vals[0]]], color="k", capsize=4
            )
        mark(x, p["reference"], "supervised reference", colors="k", lw=1.6)
        mark(x, p["sampled"], "reference, sampled like zero-shot", colors="k", lw=1.0, linestyles="--")
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_xticks(range(len(runs)), runs, rotation=25, ha="right", fontsize=8)
    ax.set_ylabel(f"AUROC ({task})")
    ax.set_ylim(0.3, 1.0)
    ax.set_title(title, fontsize=10)
    if labelled:  # a reference to tell apart from the bars
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png

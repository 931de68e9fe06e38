"""The report's "patients" section: a few held-out samples of one evaluated task, each with its page.

From the evaluations under a report's directory it takes the one whose model has the most modalities
(the first by name among equals) and its task with the most samples of the rarer class, and explains
four samples: the highest- and lowest-risk positives and negatives (the confident hits, the misses, the
false alarms, the confident negatives). Each page replays the evaluation's own chunk
(`mmehr.explain.replay`), so its risk is the one the evaluation recorded. Pages go to
`DIR/patients/<run>-<task>-sample<N>/`; a page already there for the same evaluation and sample is kept.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import polars as pl

from mmehr.checkpoint import load_config_of, load_model, resolve_checkpoint
from mmehr.evaluate.cli import eval_data_from_config
from mmehr.explain.collect import explain_sample
from mmehr.explain.page import write_page
from mmehr.explain.replay import ChunkReplayer, iso, replay_of_evaluation
from mmehr.io import is_complete, read_json

PICKS = (
    ("highest-risk positive", True, False),
    ("lowest-risk positive", True, True),
    ("highest-risk negative", False, False),
    ("lowest-risk negative", False, True),
)


def _checkpoint_of(eval_dir: Path) -> Path | None:
    manifest = eval_dir / "manifest.json"
    checkpoint = Path(read_json(manifest)["checkpoint"]) if manifest.is_file() else None
    return checkpoint if checkpoint is not None and checkpoint.exists() else None


def choose(evals: dict[str, Path]) -> tuple[str, Path, str] | None:
    """(run name, evaluation directory, task) to explain patients of, or None if none fits."""
    best = None
    for name, d in evals.items():
        checkpoint = _checkpoint_of(d)
        if checkpoint is None:
            continue
        n_modalities = len(load_config_of(resolve_checkpoint(checkpoint)).model.fusion.modalities)
        for path in sorted(d.glob("*/samples.parquet")):
            if not (path.parent / "chunks" / "settings.json").is_file():
                continue
            s = pl.read_parquet(path).drop_nulls("predicted_boolean_probability")
            n_pos = int(s["boolean_value"].sum())
            key = (n_modalities, min(n_pos, s.height - n_pos))
            if key[1] > 0 and (best is None or key > best[0]):
                best = (key, name, d, path.parent.name)
    return None if best is None else best[1:]


def picks(samples: pl.DataFrame) -> list[tuple[str, int]]:
    """(which, sample index) of the highest- and lowest-risk positive and negative, each sample once."""
    s = samples.with_row_index("sample").drop_nulls("predicted_boolean_probability")
    out, seen = [], set()
    for which, label, lowest in PICKS:
        rows = s.filter(pl.col("boolean_value") == label).sort(
            "predicted_boolean_probability", "sample", descending=[not lowest, False]
        )
        if rows.height and int(rows["sample"][0]) not in seen:
            seen.add(int(rows["sample"][0]))
            out.append((which, int(rows["sample"][0])))
    return out


def _page_dir(root: Path, run: str, task: str, n: int) -> Path:
    return root / "patients" / f"{re.sub(r'[^A-Za-z0-9_.-]+', '-', run)}-{task}-sample{n}"


def _current(page: Path, eval_dir: Path, n: int) -> bool:
    if not is_complete(page):
        return False
    m = read_json(page / "manifest.json")
    return m.get("evaluation") == str(eval_dir) and m.get("sample") == n and not m.get("show_text")


def report_section(root: Path, evals: dict[str, Path]) -> list[str]:
    """`patients_section` for `mmehr report`: pages that cannot be written (a checkpoint or store moved
    away) leave a line saying why instead of failing the report."""
    try:
        return patients_section(root, evals)
    except (FileNotFoundError, ValueError, RuntimeError, KeyError) as e:
        print(f"mmehr report: no patient pages: {e}", file=sys.stderr)
        return ["## Patients", "", f"No patient pages: {e}", ""]


def patients_section(root: Path, evals: dict[str, Path], device: str = "cpu") -> list[str]:
    """The report's markdown lines for the section (writing the pages it links); [] without a fit."""
    chosen = choose(evals)
    if chosen is None:
        return []
    run, eval_dir, task = chosen
    eval_dir = eval_dir.resolve()
    samples = pl.read_parquet(eval_dir / task / "samples.parquet").with_columns(
        pl.col("prediction_time").cast(pl.Int64)
    )
    chosen_picks = picks(samples)
    pages = {n: _page_dir(root, run, task, n) for _, n in chosen_picks}
    todo = [n for n, page in pages.items() if not _current(page, eval_dir, n)]
    if todo:
        checkpoint = _checkpoint_of(eval_dir)
        model, cfg = load_model(resolve_checkpoint(checkpoint), device)
        data = eval_data_from_config(cfg, argparse.Namespace(context_tokens=None, timelines=None))
        replayer = ChunkReplayer(model, replay_of_evaluation(eval_dir, task, checkpoint, data), device)
        replayer.want(todo)
        for n in todo:
            ex = explain_sample(model, replayer, n, evaluation=str(eval_dir))
            write_page(ex, pages[n], heat_strip=True)
    lines = [
        "## Patients",
        "",
        f"Four held-out samples of `{task}` from `{run}`: the highest- and lowest-risk positives and "
        "negatives. Each page shows the context on a time axis, the modality events and whether the model "
        "could see them, the cross-attention and gates, the risk with each modality knocked out, and the "
        "sampled futures (`mmehr explain`, replaying the evaluation's own rollouts).",
        "",
        "| which | sample | subject | prediction time | label | predicted risk | page |",
        "|---|---|---|---|---|---|---|",
    ]
    for which, n in chosen_picks:
        row = samples.row(n, named=True)
        when = iso(row["prediction_time"])
        link = pages[n].relative_to(root).as_posix() + "/index.html"
        lines.append(
            f"| {which} | {n} | {row['subject_id']} | {when} | {'positive' if row['boolean_value'] else 'negative'} "
            f"| {row['predicted_boolean_probability']:.2f} | [page]({link}) |"
        )
    return [*lines, ""]

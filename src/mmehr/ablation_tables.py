"""An ablation's evaluations read back: each task's metrics per variant, its predictions, the paired AUROC
difference of two runs over seeds, and the markdown of such differences. `mmehr.experiments` tables a
grid with them; `mmehr.report` and `benchmarks/compare_runs.py` read the same outputs."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl

from mmehr.evaluate.metrics import pooled_paired_auroc_difference


def read_metrics(eval_dir: Path, task: str) -> dict[str, dict[str, dict[str, float]]]:
    """{variant: {metric: {value, lo, hi}}} of one task: "full", "without_<modality>" knock-outs, and
    the supervised references: "reference:<name>" and "reference" (the one that sees what the run sees),
    whose "zero_shot_minus_reference" is the paired AUROC difference and "auroc_at_rollouts" its AUROC
    with its probabilities sampled like the zero-shot ones (`metrics.sampled_auroc`)."""
    path = eval_dir / task / "metrics.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: evaluation of {task} did not finish")
    result = json.loads(path.read_text())
    out = {"full": result["metrics"]}
    for modality, k in (result.get("knockout") or {}).items():
        out[f"without_{modality}"] = k["metrics"]
    reference = result.get("reference") or {}
    for name, r in reference.items():
        if name != "matched":
            out[f"reference:{name}"] = r["metrics"]
    if reference:
        matched = reference[reference["matched"]]
        out["reference"] = {
            **matched["metrics"],
            "zero_shot_minus_reference": matched["zero_shot_minus_reference"],
        }
        if "auroc_at_rollouts" in matched:  # evaluations before it was recorded lack it
            out["reference"]["auroc_at_rollouts"] = {"value": matched["auroc_at_rollouts"]["value"]}
    return out


def read_predictions(eval_dir: Path, task: str) -> pl.DataFrame | None:
    """One task's predictions.parquet of an evaluation, or None where that task has none (yet)."""
    path = eval_dir / task / "predictions.parquet"
    return pl.read_parquet(path) if path.is_file() else None


def paired_difference(evals: list[tuple[Path, Path]], task: str) -> dict | None:
    """AUROC(a) - AUROC(b) on the same samples for evaluation directories (a, b), one pair per seed: the
    mean over the pairs both of whose evaluations finished, with the seed-pooled subject-bootstrap CI
    ("seeds": how many pairs). None when no pair has both. Every pair must have scored the same samples."""
    ys, pa, pb, groups, keys = None, [], [], None, None
    for eval_a, eval_b in evals:
        da, db = read_predictions(eval_a, task), read_predictions(eval_b, task)
        if da is None or db is None:
            continue
        da, db = (
            d.select(
                "subject_id",
                "prediction_time",
                "boolean_value",
                pl.col("predicted_boolean_probability").alias("p"),
            )
            for d in (da, db)
        )
        j = da.join(db.drop("boolean_value"), on=["subject_id", "prediction_time"], suffix="_b")
        j = j.sort("subject_id", "prediction_time")
        if ys is None:
            ys, groups, keys = (
                j["boolean_value"].to_numpy(),
                j["subject_id"].to_numpy(),
                j.select("subject_id", "prediction_time"),
            )
        elif not j.select("subject_id", "prediction_time").equals(keys):
            raise ValueError(
                f"{eval_a} and {eval_b} ({task}) were evaluated on other samples than {evals[0][0]}"
            )
        pa.append(j["p"].to_numpy())
        pb.append(j["p_b"].to_numpy())
    return pooled_paired_auroc_difference(ys, pa, pb, groups=groups) if pa else None


def comparisons_markdown(records: list[dict]) -> str:
    if not records:
        return ""
    lines = [
        "### Paired comparisons (AUROC(a) - AUROC(b) on the same samples; mean over seeds, seed-pooled 95% CI)\n",
        "| a | b | task | seeds | difference |",
        "|---|---|---|---|---|",
    ]
    for r in records:
        mark = " (CI above 0)" if r["lo"] > 0 else " (CI below 0)" if r["hi"] < 0 else ""
        lines.append(
            f"| {r['a']} | {r['b']} | {r['task']} | {r['seeds']} | {r['value']:+.3f} [{r['lo']:+.3f}, {r['hi']:+.3f}]{mark} |"
        )
    return "\n".join(lines) + "\n"

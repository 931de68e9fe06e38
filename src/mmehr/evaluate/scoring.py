"""Scoring evaluated units: thresholds, bootstrap metrics, stop reasons, cohorts, and the run's summary.md."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from mmehr.data.timelines import TimelineStore
from mmehr.evaluate.metrics import bootstrap_metrics, recorded_sampled_auroc
from mmehr.evaluate.sampler import STOP_REASONS, UNFINISHED_WARNING
from mmehr.io import read_json
from mmehr.units import DAY_US

# Cohorts by codes in the history before the prediction time (ICD-9 and ICD-10 diagnosis tokens, or the
# `ethos` preset's ICD-10-CM category tokens): where the paper expects ECG (arrhythmia / ischaemia) and
# CXR (pulmonary) to matter most.
DEFAULT_COHORTS = {
    "cardiac": r"^(DIAGNOSIS//ICD//(9//(41[0-4]|427)|10//I(2[0-5]|4[7-9]))|ICD//CM//I(2[0-5]|4[7-9])$)",
    "pulmonary": r"^(DIAGNOSIS//ICD//(9//(4[6-9]\d|5[01]\d)|10//J)|ICD//CM//J)",
}


def cohort_members(samples: pl.DataFrame, store: TimelineStore, pattern: str) -> np.ndarray:
    """(n,) bool: samples whose timeline before the context end holds a token matching `pattern`."""
    ids = np.zeros(len(store.vocab), dtype=bool)
    ids[store.vocab.ids_matching(pattern)] = True
    out = np.zeros(samples.height, dtype=bool)
    for j, (i, end) in enumerate(zip(samples["subject_index"].to_list(), samples["context_end"].to_list())):
        tokens, _ = store.timeline(int(i))
        out[j] = bool(ids[np.asarray(tokens[:end])].any())
    return out


def conclusive(scored: pl.DataFrame) -> pl.DataFrame:
    """The scored samples that have a probability (at least one of their rollouts counts)."""
    return scored.filter(pl.col("predicted_boolean_probability").is_not_null())


def stop_reason_fractions(rollouts: pl.DataFrame) -> dict[str, float]:
    """Share of rollouts that ended by each reason (outcome, stop, timeline_end, time_limit, unfinished)."""
    n = max(rollouts.height, 1)
    counts = dict(rollouts.group_by("stop_reason").len().iter_rows())
    return {r: counts.get(r, 0) / n for r in STOP_REASONS}


# A stop no real timeline of the same samples ends on is flagged (summary.md, the report, `mmehr
# evaluate`'s output) when the rollouts' share of it predicts at least this many such real endings among the
# samples: a trajectory the model makes up (e.g. an ICU stay left through a hospital discharge without an
# ICU discharge, README: "Media after the prediction time"), not a rare ending a small sample lacks (a
# real share p would leave none of n samples with probability (1 - p)^n <= e^-5).
UNREAL_END_EXPECTED = 5.0


def ending_shares(rollouts: pl.DataFrame) -> dict:
    """How the rollouts ended and how the real timelines of the same samples did, as shares, largest
    first: `rollouts` by the outcome or stop token a rollout ended on ("outcome: MEDS_DEATH", "stop:
    ICU_DISCHARGE") or its other reason (time_limit, timeline_end, unfinished); `real` by each sample's
    real ending token ("" where its timeline ends first); `samples` their number. Side by side they show
    the trajectories the model makes up."""
    ended = pl.col("stop_reason").is_in(["outcome", "stop"])
    key = (
        pl.when(ended)
        .then(pl.col("stop_reason") + ": " + pl.col("last_token"))
        .otherwise(pl.col("stop_reason"))
    )

    def shares(frame: pl.DataFrame, col: pl.Expr) -> dict[str, float]:
        counts = frame.group_by(col.alias("end")).len().sort(["len", "end"], descending=[True, False])
        return {row["end"]: row["len"] / max(frame.height, 1) for row in counts.iter_rows(named=True)}

    real = rollouts.group_by("sample").agg(pl.col("true_outcome").first())
    return {
        "rollouts": shares(rollouts, key),
        "real": shares(real, pl.col("true_outcome").fill_null("")),
        "samples": real.height,
    }


def unreal_end_warnings(name: str, ends: dict | None) -> list[str]:
    """One sentence per stop token the rollouts of task `name` end on that no real timeline of its samples
    does, where the rollouts' share predicts at least UNREAL_END_EXPECTED of them (`ending_shares`). None
    for an evaluation that recorded no endings, or (written at 3de4120, before 6981117) not their count."""
    if not ends or "samples" not in ends:
        return []
    return [
        f"{share:.0%} of {name}'s rollouts end on {end.removeprefix('stop: ')}, which no real timeline of "
        f"these {ends['samples']} samples ends on"
        for end, share in ends["rollouts"].items()
        if end.startswith("stop: ")
        and end.removeprefix("stop: ") not in ends["real"]
        and share * ends["samples"] >= UNREAL_END_EXPECTED
    ]


def clean_json(obj):
    """NaN -> None, so metrics.json is strict JSON."""
    if isinstance(obj, dict):
        return {k: clean_json(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [clean_json(v) for v in obj]
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


def unit_summary(scored: pl.DataFrame, rollouts: pl.DataFrame, threshold: float, n_boot: int) -> dict:
    """Bootstrap metrics (subjects resampled) and rollout statistics of one scored unit.

    Metrics are computed on the samples that have a probability; `n_without_probability` counts the
    others (every rollout unfinished or left out by the task's rule), `n_samples` all of them.
    """
    kept = conclusive(scored)
    y = kept["boolean_value"].to_numpy()
    p = kept["predicted_boolean_probability"].to_numpy()
    n_tok = rollouts["n_tokens"].to_numpy()
    finished = rollouts.filter(pl.col("stop_reason").is_in(["outcome", "stop", "timeline_end"]))
    return {
        "n_samples": scored.height,
        "n_without_probability": scored.height - kept.height,
        "n_subjects": kept["subject_id"].n_unique(),
        "n_positive": int(y.sum()),
        "prevalence": float(y.mean()) if y.size else float("nan"),
        "metrics": bootstrap_metrics(
            y, p, groups=kept["subject_id"].to_numpy(), threshold=threshold, n_boot=n_boot
        ),
        "stop_reasons": stop_reason_fractions(rollouts),
        "ends": ending_shares(rollouts),
        "rollouts": {
            "n": rollouts.height,
            "unfinished": int((rollouts["stop_reason"] == "unfinished").sum()),
            "counted": int(rollouts["counted"].sum()),
            "mean_tokens": float(n_tok.mean()) if n_tok.size else 0.0,
            "max_tokens": int(n_tok.max()) if n_tok.size else 0,
            "mean_elapsed_days": float(rollouts["elapsed_us"].mean() or 0.0) / DAY_US,
            # ETHOS reports a rollout's simulated time to its ending token beside the real one
            "median_elapsed_days_finished": float(finished["elapsed_us"].median() or 0.0) / DAY_US,
            "median_true_elapsed_days": float(
                rollouts.filter(pl.col("true_elapsed_us") >= 0)["true_elapsed_us"].median() or 0.0
            )
            / DAY_US,
        },
    }


@dataclass
class EvalOptions:
    """What to evaluate besides the sampler: the split, the threshold's source, hidden modalities,
    knock-outs (each also hidden in turn), cohorts (name -> token regex), bootstrap draws, and the
    supervised references beside the zero-shot numbers."""

    split: str = "held_out"
    max_samples: int | None = None
    threshold_from: str = "tuning"  # "tuning", "none" (0.5), or a JSON file {task: threshold}
    tuning_samples: int | None = None  # cap on the tuning split's samples (default: max_samples)
    hidden: tuple[str, ...] = ()
    knockout: tuple[str, ...] = ()
    cohorts: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_COHORTS))
    n_boot: int = 1000
    unsafe_leak: bool = False
    reference: bool = True  # fit the supervised references (mmehr.evaluate.reference) beside zero-shot
    reference_train_samples: int = 6000  # train-split task samples the references are fit on (at most)
    save_tokens: bool = False


def fixed_threshold(source: str, task: str) -> float:
    if source == "none":
        return 0.5
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"--threshold-from {source}: not 'tuning', 'none', or an existing JSON file")
    data = read_json(path)
    value = data if isinstance(data, int | float) else data.get(task) if isinstance(data, dict) else None
    if not isinstance(value, int | float):
        raise ValueError(f"{path}: no threshold for task {task!r} (expected a number or {{task: number}})")
    return float(value)


def format_ci(m: dict | None, key: str) -> str:
    if not m or m.get(key) is None or m[key]["value"] is None or not np.isfinite(m[key]["value"]):
        return "n/a"
    v = m[key]
    lo, hi = v.get("lo"), v.get("hi")
    ci = (
        f" [{lo:.3f}, {hi:.3f}]"
        if lo is not None and hi is not None and np.isfinite(lo) and np.isfinite(hi)
        else ""
    )
    return f"{v['value']:.3f}{ci}"


def summary_markdown(results: dict[str, dict], header: dict) -> str:
    """The run's summary.md: one row per task, then stop reasons, cohorts and knock-outs."""
    lines = [f"# mmehr evaluate: {header['checkpoint']}", ""]
    lines += [f"- {k}: {v}" for k, v in header.items() if k != "checkpoint"]
    lines += ["", "## Metrics (95% bootstrap CI over subjects; F1 at the threshold chosen on tuning)", ""]
    cols = ("auroc", "auprc", "f1_macro", "f1_pos", "brier", "ece")
    lines.append("| task | n | positive | no probability | threshold | " + " | ".join(cols) + " |")
    lines.append("|---|---|---|---|---|" + "---|" * len(cols))
    for name, r in results.items():
        cells = " | ".join(format_ci(r["metrics"], c) for c in cols)
        lines.append(
            f"| {name} | {r['n_samples']} | {r['n_positive']} | {r['n_without_probability']} | "
            f"{r['threshold']['value']:.3f} | {cells} |"
        )
    lines += [
        "",
        "n and positive count the samples with a probability; 'no probability': samples none of whose "
        "rollouts counts (all unfinished, or all left out by the task's rule), left out of the metrics.",
        "",
        "## How rollouts ended (share of rollouts)",
        "",
        "Unfinished rollouts reached a safety cap (tokens, or simulated time for a task without a time "
        "limit) before any outcome or stop: they never count, as positive or negative.",
        "",
    ]
    lines.append(
        "| task | " + " | ".join(STOP_REASONS) + " | unfinished (n) | counted | mean tokens | "
        "median simulated / true days |"
    )
    lines.append("|---|" + "---|" * (len(STOP_REASONS) + 4))
    for name, r in results.items():
        fr = " | ".join(f"{r['stop_reasons'][s]:.1%}" for s in STOP_REASONS)
        ro = r["rollouts"]
        lines.append(
            f"| {name} | {fr} | {ro['unfinished']} | {ro['counted']} / {ro['n']} | {ro['mean_tokens']:.1f} | "
            f"{ro['median_elapsed_days_finished']:.2f} / {ro['median_true_elapsed_days']:.2f} |"
        )
    ends = {name: r["ends"] for name, r in results.items() if r.get("ends")}
    if ends:
        lines += [
            "",
            "## Where rollouts ended, beside the real timelines (share)",
            "",
            "The token each rollout ended on (or its other reason), and the real ending of the same samples: "
            "an ending the real timelines never have is a trajectory the model made up.",
            "",
            "| task | rollouts | real timelines |",
            "|---|---|---|",
        ]

        def cell(shares: dict[str, float]) -> str:
            return ", ".join(f"{k or '(timeline ends)'} {v:.1%}" for k, v in shares.items())

        for name, e in ends.items():
            lines.append(f"| {name} | {cell(e['rollouts'])} | {cell(e['real'])} |")
        for name, e in ends.items():
            lines += [line for w in unreal_end_warnings(name, e) for line in ("", f"Warning: {w}.")]
    refs = {name: r["reference"] for name, r in results.items() if r.get("reference")}
    if refs:
        names = sorted({k for ref in refs.values() for k in ref if k != "matched"}, key=_reference_order)
        lines += [
            "",
            "## Zero-shot beside the supervised reference (AUROC, 95% CI)",
            "",
            "Logistic regression on the same context (bag of codes; plus each modality's mean-pooled",
            "embeddings of the events before the prediction time), fit on the train split's task samples",
            "and scored on these samples: how much signal the task holds. `zero-shot - matched` is the",
            "paired difference zero-shot minus the reference that sees what the model sees; the last",
            "column is that reference's AUROC had its probabilities been estimated like the zero-shot ones,",
            "from as many sampled futures per sample (mean ± sd over draws): what rollouts alone cost.",
            "",
            "| task | zero-shot | "
            + " | ".join(f"reference {n}" for n in names)
            + " | zero-shot - matched | matched, sampled like zero-shot |",
            "|---|---|" + "---|" * len(names) + "---|---|",
        ]
        for name, ref in refs.items():
            cells = " | ".join(format_ci(ref[n]["metrics"], "auroc") if n in ref else "" for n in names)
            matched = ref[ref["matched"]]
            d = matched["zero_shot_minus_reference"]
            sampled = recorded_sampled_auroc(matched)
            at_rollouts = f"{sampled['value']:.3f} ± {sampled['sd']:.3f}" if sampled else "n/a"
            lines.append(
                f"| {name} | {format_ci(results[name]['metrics'], 'auroc')} | {cells} | "
                f"{format_ci({'d': d}, 'd')} ({ref['matched']}) | {at_rollouts} |"
            )
    unfinished = [n for n, r in results.items() if r["stop_reasons"]["unfinished"] > UNFINISHED_WARNING]
    if unfinished:
        lines += [
            "",
            f"Warning: over {UNFINISHED_WARNING:.0%} of the rollouts of {', '.join(unfinished)} are unfinished: "
            "their probabilities rest on fewer rollouts; raise --max-new-tokens.",
        ]
    if any(r["cohorts"] for r in results.values()):
        lines += ["", "## Cohorts (codes in the history before the prediction time)", ""]
        lines += ["| task | cohort | n | positive | AUROC | AUPRC |", "|---|---|---|---|---|---|"]
        for name, r in results.items():
            for cohort, c in r["cohorts"].items():
                row = f"| {name} | {cohort} | {c['n_samples']} | {c['n_positive']} | {format_ci(c['metrics'], 'auroc')} |"
                lines.append(f"{row} {format_ci(c['metrics'], 'auprc')} |")
    if any(r["knockout"] for r in results.values()):
        lines += ["", "## Modality knock-out (the same checkpoint with one modality hidden)", ""]
        lines += ["| task | hidden | AUROC | AUROC(full) - AUROC(hidden) |", "|---|---|---|---|"]
        for name, r in results.items():
            for m, k in r["knockout"].items():
                d = k["auroc_difference"]
                lines.append(
                    f"| {name} | {m} | {format_ci(k['metrics'], 'auroc')} | {format_ci({'d': d}, 'd')} |"
                )
    return "\n".join(lines) + "\n"


def _reference_order(name: str) -> tuple[int, str]:
    """ehr first, then ehr+<modality>, then ehr+all."""
    return (0 if name == "ehr" else 2 if name == "ehr+all" else 1, name)

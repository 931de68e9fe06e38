"""Binary metrics for zero-shot task predictions: AUROC, AUPRC, F1, Brier, calibration, bootstrap CIs.

F1 is reported two ways. `f1_macro` is the mean of the positive-class and negative-class F1 scores: the
paper's "F1" (values near 0.70 at AUPRC near 0.45 and a few % prevalence imply macro averaging).
`f1_pos` is the usual positive-class F1. Both use a decision threshold chosen on the tuning split
(`choose_threshold`), never on the split being scored.

Confidence intervals are percentile bootstraps over subjects (all of a subject's samples are resampled
together), so repeated stays of one patient do not shrink the interval.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy.stats import rankdata

METRICS = ("auroc", "auprc", "f1_macro", "f1_pos", "brier", "ece")


def auroc(y: np.ndarray, p: np.ndarray) -> float:
    """Area under the ROC curve by the rank-sum identity (ties get average ranks); NaN if one class."""
    y = np.asarray(y, dtype=bool)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(p)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _counts_at_thresholds(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(true positives, false positives) predicted positive at each distinct score, highest first."""
    order = np.argsort(-np.asarray(p, dtype=float), kind="mergesort")
    p_sorted, y_sorted = np.asarray(p)[order], np.asarray(y, dtype=bool)[order]
    # Count only at the last index of each run of tied scores.
    last = np.r_[np.flatnonzero(np.diff(p_sorted)), y_sorted.size - 1]
    tps = np.cumsum(y_sorted)[last]
    return tps, (last + 1) - tps


def auprc(y: np.ndarray, p: np.ndarray) -> float:
    """Average precision (step-wise area under precision-recall, as scikit-learn); NaN if no positive."""
    y = np.asarray(y, dtype=bool)
    n_pos = int(y.sum())
    if n_pos == 0:
        return float("nan")
    tp, fp = _counts_at_thresholds(y, p)
    precision = tp / (tp + fp)
    recall = tp / n_pos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def f1_scores(y: np.ndarray, p: np.ndarray, threshold: float) -> tuple[float, float]:
    """(macro F1, positive-class F1) for predictions p >= threshold."""
    y = np.asarray(y, dtype=bool)
    yhat = np.asarray(p) >= threshold
    tp = np.sum(y & yhat)
    fp = np.sum(~y & yhat)
    fn = np.sum(y & ~yhat)
    tn = np.sum(~y & ~yhat)
    f1_pos = 2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) else 0.0
    f1_neg = 2 * tn / (2 * tn + fn + fp) if (2 * tn + fn + fp) else 0.0
    return float((f1_pos + f1_neg) / 2), float(f1_pos)


def brier(y: np.ndarray, p: np.ndarray) -> float:
    return float(np.mean((np.asarray(p, dtype=float) - np.asarray(y, dtype=float)) ** 2))


def calibration_bins(y: np.ndarray, p: np.ndarray, n_bins: int = 10) -> dict[str, np.ndarray]:
    """Equal-width probability bins: mean predicted, observed rate and count per non-empty bin."""
    y = np.asarray(y, dtype=float)
    p = np.asarray(p, dtype=float)
    idx = np.clip((p * n_bins).astype(int), 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins)
    mean_p = np.bincount(idx, weights=p, minlength=n_bins)
    rate = np.bincount(idx, weights=y, minlength=n_bins)
    keep = count > 0
    return {
        "mean_predicted": mean_p[keep] / count[keep],
        "observed_rate": rate[keep] / count[keep],
        "count": count[keep],
    }


def ece(y: np.ndarray, p: np.ndarray, n_bins: int = 10) -> float:
    """Expected calibration error over equal-width bins."""
    b = calibration_bins(y, p, n_bins)
    if b["count"].sum() == 0:
        return float("nan")
    return float(np.sum(b["count"] * np.abs(b["mean_predicted"] - b["observed_rate"])) / b["count"].sum())


def choose_threshold(y: np.ndarray, p: np.ndarray, criterion: str = "f1_macro") -> float:
    """Threshold maximising macro (or positive-class) F1 on these labels: call it on the TUNING split.

    Candidates are the distinct predicted values (rollout fractions take few values) and one just above
    the largest (nothing predicted positive, which a degenerate model's tuning split can favour); ties keep
    the lowest. Falls back to 0.5 when the split has a single class.
    """
    y = np.asarray(y, dtype=bool)
    if y.all() or not y.any():
        return 0.5
    best_t, best = 0.5, -1.0
    candidates = np.unique(p)
    for t in np.r_[candidates, np.nextafter(candidates[-1], np.inf)]:
        macro, pos = f1_scores(y, p, float(t))
        score = macro if criterion == "f1_macro" else pos
        if score > best:
            best_t, best = float(t), score
    return best_t


def point_metrics(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, float]:
    macro, pos = f1_scores(y, p, threshold)
    return {
        "auroc": auroc(y, p),
        "auprc": auprc(y, p),
        "f1_macro": macro,
        "f1_pos": pos,
        "brier": brier(y, p),
        "ece": ece(y, p),
    }


def _subject_resamples(groups: np.ndarray, n_boot: int, seed: int):
    """Yield index arrays, each a bootstrap resample of whole subjects."""
    rng = np.random.default_rng(seed)
    uniq, inverse = np.unique(groups, return_inverse=True)
    members = np.split(np.argsort(inverse, kind="stable"), np.cumsum(np.bincount(inverse))[:-1])
    for _ in range(n_boot):
        pick = rng.integers(0, uniq.size, uniq.size)
        yield np.concatenate([members[i] for i in pick])


def bootstrap_metrics(
    y: np.ndarray,
    p: np.ndarray,
    *,
    groups: np.ndarray | None = None,
    threshold: float = 0.5,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict[str, dict[str, float]]:
    """Point estimate and percentile CI per metric: {metric: {"value", "lo", "hi"}}.

    `groups` (e.g. subject ids) makes the resampling unit a subject; default: each sample alone.
    """
    y = np.asarray(y, dtype=bool)
    p = np.asarray(p, dtype=float)
    groups = np.arange(y.size) if groups is None else np.asarray(groups)
    point = point_metrics(y, p, threshold)
    draws = {k: [] for k in METRICS}
    for idx in _subject_resamples(groups, n_boot, seed):
        for k, v in point_metrics(y[idx], p[idx], threshold).items():
            draws[k].append(v)
    out = {}
    for k in METRICS:
        d = np.asarray(draws[k], dtype=float)
        d = d[~np.isnan(d)]
        lo, hi = np.quantile(d, [alpha / 2, 1 - alpha / 2]) if d.size else (np.nan, np.nan)
        out[k] = {"value": point[k], "lo": float(lo), "hi": float(hi)}
    out["n"] = {"value": float(y.size), "lo": float("nan"), "hi": float("nan")}
    out["n_pos"] = {"value": float(y.sum()), "lo": float("nan"), "hi": float("nan")}
    return out


def paired_auroc_difference(
    y: np.ndarray,
    p_a: np.ndarray,
    p_b: np.ndarray,
    *,
    groups: np.ndarray | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, float]:
    """AUROC(a) - AUROC(b) on the same samples, with a paired subject-bootstrap 95% CI."""
    y = np.asarray(y, dtype=bool)
    groups = np.arange(y.size) if groups is None else np.asarray(groups)
    diffs = []
    for idx in _subject_resamples(groups, n_boot, seed):
        d = auroc(y[idx], p_a[idx]) - auroc(y[idx], p_b[idx])
        if not np.isnan(d):
            diffs.append(d)
    lo, hi = np.quantile(diffs, [0.025, 0.975]) if diffs else (np.nan, np.nan)
    return {"value": auroc(y, p_a) - auroc(y, p_b), "lo": float(lo), "hi": float(hi)}


def pooled_paired_auroc_difference(
    y: np.ndarray,
    p_a: list[np.ndarray],
    p_b: list[np.ndarray],
    *,
    groups: np.ndarray | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, float]:
    """Mean over seeds of AUROC(a_s) - AUROC(b_s), all on the same samples y, with a subject-bootstrap 95%
    CI in which each draw resamples the subjects once for every seed (the seeds' uncertainty pooled)."""
    y = np.asarray(y, dtype=bool)
    groups = np.arange(y.size) if groups is None else np.asarray(groups)

    def mean_difference(idx: np.ndarray) -> float:
        return float(np.mean([auroc(y[idx], a[idx]) - auroc(y[idx], b[idx]) for a, b in zip(p_a, p_b)]))

    diffs = [d for idx in _subject_resamples(groups, n_boot, seed) if not np.isnan(d := mean_difference(idx))]
    lo, hi = np.quantile(diffs, [0.025, 0.975]) if diffs else (np.nan, np.nan)
    return {"value": mean_difference(np.arange(y.size)), "lo": float(lo), "hi": float(hi), "seeds": len(p_a)}


def sampled_auroc(
    y: np.ndarray, p: np.ndarray, rollouts: np.ndarray | int, *, draws: int = 200, seed: int = 0
) -> dict[str, float]:
    """The AUROC that probabilities `p` get when each is estimated the way a zero-shot one is: as the share
    of `rollouts` (per sample, or one count for all) sampled futures that reach the outcome, i.e. of
    Bernoulli(p) draws. Mean and sd over `draws` repetitions. What a model whose outcome probabilities were
    exactly p would score with these rollouts: the part of a gap to p's own AUROC that only more rollouts
    close. Samples with no rollout are left out."""
    y = np.asarray(y, dtype=bool)
    p = np.clip(np.asarray(p, dtype=float), 0.0, 1.0)
    n = np.broadcast_to(np.asarray(rollouts, dtype=np.int64), y.shape)
    keep = n > 0
    y, p, n = y[keep], p[keep], n[keep]
    rng = np.random.default_rng(seed)
    values = np.array([auroc(y, rng.binomial(n, p) / n) for _ in range(draws)])
    values = values[~np.isnan(values)]
    if not values.size:
        return {"value": float("nan"), "sd": float("nan"), "draws": 0}
    return {"value": float(values.mean()), "sd": float(values.std()), "draws": int(values.size)}


def recorded_sampled_auroc(reference: dict) -> dict | None:
    """A reference's `sampled_auroc` as metrics.json records it (`auroc_at_rollouts`), or None where there
    is none to show: an evaluation from before it was recorded, or one class among the samples."""
    sampled = reference.get("auroc_at_rollouts")
    if not sampled or sampled.get("value") is None or np.isnan(sampled["value"]):
        return None
    return sampled


def roc_curve(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false-positive rate, true-positive rate) at each distinct threshold, from (0,0) to (1,1)."""
    tps, fps = _counts_at_thresholds(y, p)
    return np.r_[0.0, fps / max(fps[-1], 1)], np.r_[0.0, tps / max(tps[-1], 1)]


def pr_curve(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(recall, precision) at each distinct threshold."""
    tps, fps = _counts_at_thresholds(y, p)
    return np.r_[0.0, tps / max(tps[-1], 1)], np.r_[1.0, tps / (tps + fps)]


def plot_task_curves(
    curves: Sequence[tuple[str, np.ndarray, np.ndarray]], title: str, out_png: str | Path
) -> Path:
    """ROC, precision-recall and calibration panels for one task, one line per model label.

    `curves`: (label, y_true, y_prob) per model.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 4.2))
    for label, y, p in curves:
        fpr, tpr = roc_curve(y, p)
        axes[0].plot(fpr, tpr, label=f"{label} (AUROC {auroc(y, p):.3f})")
        rec, prec = pr_curve(y, p)
        axes[1].step(rec, prec, where="post", label=f"{label} (AUPRC {auprc(y, p):.3f})")
        b = calibration_bins(y, p)
        axes[2].plot(b["mean_predicted"], b["observed_rate"], marker="o", label=label)
    axes[0].plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    axes[2].plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    if curves:
        prevalence = float(np.mean(curves[0][1]))
        axes[1].axhline(prevalence, color="grey", lw=0.8, ls="--")
    for ax, (xl, yl, t) in zip(
        axes,
        [
            ("false-positive rate", "true-positive rate", "ROC"),
            ("recall", "precision", "precision-recall"),
            ("predicted probability", "observed rate", "calibration"),
        ],
    ):
        ax.set(xlabel=xl, ylabel=yl, title=t, xlim=(0, 1), ylim=(0, 1.02))
        ax.legend(fontsize=8, loc="lower right" if t == "ROC" else "best")
    fig.suptitle(title)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png

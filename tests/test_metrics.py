import numpy as np
import pytest
from sklearn.metrics import average_precision_score, brier_score_loss, f1_score, roc_auc_score

from mmehr.evaluate.metrics import (
    auprc,
    auroc,
    bootstrap_metrics,
    choose_threshold,
    ece,
    f1_scores,
    paired_auroc_difference,
    plot_task_curves,
    recorded_sampled_auroc,
    roc_curve,
    sampled_auroc,
)


@pytest.fixture
def scored():
    rng = np.random.default_rng(0)
    y = rng.random(400) < 0.1
    # Rollout fractions: multiples of 1/20, with many ties, as zero-shot predictions are.
    p = np.clip(np.round((0.25 * y + rng.random(400) * 0.6) * 20) / 20, 0, 1)
    return y, p


def test_auroc_and_auprc_match_scikit_learn_with_ties(scored):
    y, p = scored
    assert auroc(y, p) == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    assert auprc(y, p) == pytest.approx(average_precision_score(y, p), abs=1e-12)


def test_f1_macro_is_mean_of_both_classes(scored):
    y, p = scored
    macro, pos = f1_scores(y, p, 0.5)
    assert macro == pytest.approx(f1_score(y, p >= 0.5, average="macro"))
    assert pos == pytest.approx(f1_score(y, p >= 0.5))


def test_single_class_gives_nan_not_a_crash():
    assert np.isnan(auroc(np.zeros(5), np.linspace(0, 1, 5)))
    assert np.isnan(auprc(np.zeros(5), np.linspace(0, 1, 5)))
    assert choose_threshold(np.zeros(5, bool), np.linspace(0, 1, 5)) == 0.5


def test_threshold_maximises_macro_f1_on_its_split(scored):
    y, p = scored
    t = choose_threshold(y, p)
    best = max(f1_scores(y, p, float(c))[0] for c in np.unique(p))
    assert f1_scores(y, p, t)[0] == pytest.approx(best)


def test_perfect_and_calibrated_cases():
    y = np.array([0, 0, 1, 1], bool)
    assert auroc(y, np.array([0.1, 0.2, 0.8, 0.9])) == 1.0
    assert auprc(y, np.array([0.1, 0.2, 0.8, 0.9])) == 1.0
    # Each prediction equals its bin's observed rate: zero calibration error.
    p = np.array([0.5, 0.5, 0.5, 0.5])
    assert ece(np.array([0, 1, 0, 1], bool), p) == pytest.approx(0.0)
    assert brier_score_loss(y, p) == pytest.approx(0.25)


def test_bootstrap_ci_brackets_the_point_estimate_and_resamples_subjects(scored):
    y, p = scored
    groups = np.repeat(np.arange(100), 4)
    res = bootstrap_metrics(y, p, groups=groups, threshold=0.5, n_boot=200, seed=1)
    for k in ("auroc", "auprc", "f1_macro", "brier"):
        assert res[k]["lo"] <= res[k]["value"] <= res[k]["hi"], k
        assert res[k]["hi"] - res[k]["lo"] > 0
    assert res["n"]["value"] == 400


def test_paired_difference_detects_a_better_model(scored):
    y, p = scored
    rng = np.random.default_rng(3)
    noisy = np.clip(p + rng.normal(0, 0.4, p.size), 0, 1)
    d = paired_auroc_difference(y, p, noisy, n_boot=300)
    assert d["value"] > 0 and d["lo"] > 0


def test_roc_curve_ends_at_corners(scored):
    fpr, tpr = roc_curve(*scored)
    assert (fpr[0], tpr[0]) == (0.0, 0.0) and (fpr[-1], tpr[-1]) == (1.0, 1.0)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)


def test_plot_writes_a_png(tmp_path, scored):
    y, p = scored
    out = plot_task_curves([("a", y, p), ("b", y, p[::-1])], "task", tmp_path / "c.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sampled_auroc_is_what_rollouts_leave_of_a_known_probability():
    rng = np.random.default_rng(1)
    p = rng.beta(2, 5, 300)
    y = rng.random(300) < p
    exact = auroc(y, p)
    many, twenty, one = (sampled_auroc(y, p, k, draws=50)["value"] for k in (5000, 20, 1))
    assert many == pytest.approx(exact, abs=0.01)  # enough futures: the probability itself
    assert one < twenty < exact  # fewer futures, noisier estimates, lower AUROC
    assert exact - twenty > 0.01
    # A certain outcome needs one future; samples with none counted are left out, not scored as 0.
    certain = sampled_auroc(y, y.astype(float), np.where(np.arange(300) % 7, 3, 0))
    assert certain["value"] == 1.0 and certain["sd"] == 0.0


def test_sampled_auroc_draws_are_reproducible():
    rng = np.random.default_rng(2)
    p = rng.random(100)
    y = rng.random(100) < p
    assert sampled_auroc(y, p, 20) == sampled_auroc(y, p, 20)


def test_recorded_sampled_auroc_is_none_where_there_is_nothing_to_show():
    recorded = {"auroc_at_rollouts": {"value": 0.81, "sd": 0.01, "draws": 200}}
    assert recorded_sampled_auroc(recorded) == recorded["auroc_at_rollouts"]
    assert recorded_sampled_auroc({"metrics": {}}) is None  # an evaluation from before it was recorded
    for one_class in (None, float("nan")):  # as metrics.json reads back, and as computed
        assert recorded_sampled_auroc({"auroc_at_rollouts": {"value": one_class, "sd": None}}) is None

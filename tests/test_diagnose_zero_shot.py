"""benchmarks/diagnose_zero_shot.py: samples meet their stay's truth, and the oracles rank as planted."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from sklearn.metrics import roc_auc_score

from mmehr.data.timelines import TimelineStore
from mmehr.evaluate.tasks import load_task, task_samples

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from diagnose_zero_shot import (
    auroc_by_rollouts,
    condition_effects,
    decided_by,
    diagnose,
    earlier_weights,
    ensemble,
    log_odds,
    planted_residual,
    planted_weights,
    residual_signal,
    rollout_ends,
    samples_with_truth,
    with_earlier_conditions,
)

HOUR = 3_600_000_000


def _truth(n: int, rng: np.random.Generator) -> pl.DataFrame:
    visible, hidden, det = rng.normal(size=n), rng.normal(size=n), rng.normal(size=n)
    admit = np.arange(n, dtype=np.int64) * 1000 * HOUR
    return pl.DataFrame(
        {
            "subject_id": np.arange(n) % 7,
            "admit_us": admit,
            "first_icu_us": admit + 5 * HOUR,
            "end_us": admit + 100 * HOUR,
            "first_icu_deterioration": det,
            "visible_risk": visible,
            "hidden_risk": hidden,
            "af": hidden > 0,
            "opacity": rng.random(n) < 0.3,
            "symptom": rng.random(n) < 0.3,
        }
    )


def test_joins_each_sample_to_its_stay_and_scores_the_oracles(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    truth = _truth(400, rng)
    # ICU-mortality samples at each first ICU admission; the outcome follows visible + deterioration.
    logit = 2.0 * truth["visible_risk"].to_numpy() + 1.5 * truth["first_icu_deterioration"].to_numpy()
    y = rng.random(400) < 1 / (1 + np.exp(-logit))
    t = truth["first_icu_us"].to_numpy()
    hours = rng.uniform(2, 72, size=400)
    death = pl.Series("death_us", np.where(y, t + (hours * HOUR).astype(np.int64), 0)).replace(0, None)
    truth = truth.with_columns(death)
    task = tmp_path / "eval" / "icu_mortality"
    task.mkdir(parents=True)
    pl.DataFrame(
        {
            "subject_id": truth["subject_id"],
            "prediction_time": pl.Series(t).cast(pl.Datetime("us")),
            "boolean_value": y,
            "predicted_boolean_probability": truth["visible_risk"].to_numpy(),  # ignores the deterioration
        }
    ).write_parquet(task / "predictions.parquet")
    pl.DataFrame(
        {"subject_id": truth["subject_id"], "prediction_time": t, "boolean_value": y, "p_ehr": logit}
    ).write_parquet(task / "reference.parquet")

    d = samples_with_truth(tmp_path / "eval", "icu_mortality", truth)
    assert d.height == 400 and (d["prediction_time"] == d["first_icu_us"]).all()  # each met its own stay
    r = diagnose(d, "icu_mortality", {"ehr_strength": 2.0, "icu_triage": 1.5})
    auroc = r["auroc"]
    assert auroc["p_ehr"] == auroc["oracle: EHR part"]  # the same ranking
    assert auroc["zero_shot"] < auroc["oracle: EHR part"] - 0.05  # it misses the deterioration
    assert r["spearman zero_shot ~ deterioration"] < 0.1 < r["spearman p_ehr ~ deterioration"]
    assert r["follows"]["zero_shot ~ af"] < 0.6  # af follows the hidden part only
    assert r["follows"]["oracle: EHR + hidden ~ af"] > 0.6  # which the oracle holds
    # An oracle that sees one condition (a single-modality run's ceiling) follows it more.
    one = diagnose(d, "icu_mortality", {"ehr_strength": 2.0, "icu_triage": 1.5, "ecg_strength": 3.0})[
        "follows"
    ]
    assert (
        one["oracle: EHR + af ~ af"] > one["oracle: EHR + hidden ~ af"]
        and "oracle: EHR + opacity ~ af" not in one
    )
    # Deaths split by how soon they come, each group against every survivor.
    groups = {k: v for k, v in r.items() if k.startswith("auroc, death")}
    sizes = [int(k.split("(")[1].rstrip(")")) for k in groups]
    assert len(groups) == 3 and sum(sizes) == int(y.sum())
    assert all(v["p_ehr"] == v["oracle: EHR part"] for v in groups.values())


def test_condition_effects_per_split_show_what_a_condition_can_add() -> None:
    rng = np.random.default_rng(1)
    n = 3000
    af, other = rng.random(n) < 0.25, rng.random(n) < 0.25
    split = np.where(np.arange(n) < 2000, "train", "held_out")
    # AF raises hospital death in train only; ICU mortality is asked of the ICU stays alone.
    death = rng.random(n) < np.where(af & (split == "train"), 0.6, 0.2)
    icu = np.where(rng.random(n) < 0.5, 1, None)
    truth = pl.DataFrame(
        {
            "split": split,
            "af": af,
            "opacity": other,
            "symptom": rng.random(n) < 0.25,
            "hospital_death": death,
            "icu_death": death,
            "first_icu_us": icu,
        }
    )
    rows = {r["split"]: r for r in condition_effects(truth, "hospital_mortality", n_boot=200)}
    assert rows["train"]["n"] == 2000 and rows["train"]["positive"] == int(death[:2000].sum())
    value, lo, hi = rows["train"]["af"]
    assert 0.6 < lo < value < hi and abs(rows["held_out"]["af"][0] - 0.5) < 0.06
    assert abs(rows["train"]["opacity"][0] - 0.5) < 0.05  # unrelated to the outcome
    icu_rows = {r["split"]: r for r in condition_effects(truth, "icu_mortality", n_boot=50)}
    assert icu_rows["train"]["n"] == int((icu[:2000] != None).sum())  # noqa: E711 (object array)


def test_rollout_ends_count_each_ending_beside_the_real_ones(tmp_path: Path) -> None:
    task = tmp_path / "eval" / "icu_mortality"
    task.mkdir(parents=True)
    pl.DataFrame(
        {
            "sample": [0, 0, 1, 1, 2, 2, 3, 3],
            "stop_reason": ["outcome", "stop", "stop", "stop", "unfinished", "outcome", "stop", "stop"],
            "last_token": ["MEDS_DEATH", "ICU_DISCHARGE", "ICU_DISCHARGE", "DISCHARGE_LOCATION//HOME",
                           "Q4", "MEDS_DEATH", "ICU_DISCHARGE", "ICU_DISCHARGE"],
            "true_outcome": ["MEDS_DEATH"] * 2 + ["ICU_DISCHARGE"] * 6,  # per sample: 1 death, 3 discharges
        }
    ).write_parquet(task / "rollouts.parquet")  # fmt: skip
    ends, real = rollout_ends(tmp_path / "eval", "icu_mortality")
    assert ends == {
        "stop: ICU_DISCHARGE": 0.5,
        "outcome: MEDS_DEATH": 0.25,
        "stop: DISCHARGE_LOCATION//HOME": 0.125,
        "unfinished": 0.125,
    }
    assert next(iter(ends)) == "stop: ICU_DISCHARGE"  # largest first
    assert real == {"ICU_DISCHARGE": 0.75, "MEDS_DEATH": 0.25}


def test_auroc_by_rollouts_rises_toward_the_full_estimate(tmp_path: Path) -> None:
    """Each sample's rollouts are positive with its true risk: fewer rollouts, a noisier probability, a
    lower AUROC; all of them give the evaluation's own probability."""
    rng = np.random.default_rng(0)
    n, k = 300, 20
    risk = rng.uniform(0.05, 0.95, n)
    y = rng.random(n) < risk
    positive = rng.random((n, k)) < risk[:, None]
    counted = np.ones((n, k), dtype=bool)
    counted[0, :] = False  # a sample none of whose rollouts counts is left out
    task = tmp_path / "eval" / "icu_mortality"
    task.mkdir(parents=True)
    pl.DataFrame({"boolean_value": y}).write_parquet(task / "samples.parquet")
    pl.DataFrame(
        {
            "sample": np.repeat(np.arange(n), k),
            "rollout": np.tile(np.arange(k), n),
            "positive": positive.ravel(),
            "counted": counted.ravel(),
        }
    ).write_parquet(task / "rollouts.parquet")
    by_k = auroc_by_rollouts(tmp_path / "eval", "icu_mortality", ks=(2, 5, 20), draws=50)
    assert by_k[2] < by_k[5] < by_k[20]
    assert by_k[20] == pytest.approx(roc_auc_score(y[1:], positive[1:].mean(axis=1)))


def test_planted_weights_read_each_condition_in_units_of_the_ehr_part() -> None:
    """A prediction that weighs AF as planted but reads the EHR part at half strength and adds noise shows
    AF at twice the planted ratio and a lower R^2; a noise-free planted one shows the planted ratios, R^2 1."""
    rng = np.random.default_rng(0)
    n = 2000
    truth = _truth(n, rng)
    ehr = 2.5 * truth["visible_risk"].to_numpy()
    af = truth["af"].cast(pl.Float64).to_numpy()
    cfg = {"ecg_strength": 3.5, "cxr_strength": 3.5, "note_strength": 3.5}
    exact = planted_weights(0.3 * (ehr + 3.5 * af) - 1.0, ehr, truth, cfg)
    assert exact["EHR part"] == pytest.approx(0.3) and exact["r2"] == pytest.approx(1.0)
    assert exact["af"] == pytest.approx((3.5, 3.5)) and abs(exact["opacity"][0]) < 1e-9
    noisy = planted_weights(0.15 * ehr + 0.3 * 3.5 * af + rng.normal(0, 0.5, n), ehr, truth, cfg)
    assert noisy["EHR part"] == pytest.approx(0.15, abs=0.01)
    assert noisy["af"][0] == pytest.approx(7.0, rel=0.1) and noisy["r2"] < 0.9


def test_a_residual_counts_only_where_it_predicts_the_outcome() -> None:
    """Noise beside the planted parts adds nothing to them; a signal they do not name (a stand-in for a lab
    trend the generator puts beside its risk) does."""
    rng = np.random.default_rng(2)
    n = 1500
    truth = _truth(n, rng)
    ehr = truth["visible_risk"].to_numpy()
    extra = rng.normal(size=n)  # a risk factor outside the planted parts
    y = rng.random(n) < 1 / (1 + np.exp(-(ehr + 2.0 * extra)))
    noise = residual_signal(planted_residual(ehr + rng.normal(0, 1.0, n), ehr, truth), ehr, truth, y)
    assert abs(noise["planted parts + residual"] - noise["planted parts"]) < 0.01
    assert abs(noise["residual alone"] - 0.5) < 0.05
    real = residual_signal(planted_residual(ehr + extra, ehr, truth), ehr, truth, y)
    assert real["planted parts + residual"] > real["planted parts"] + 0.1
    assert real["residual alone"] > 0.7
    assert residual_signal(extra, ehr, truth, np.arange(n) < 5) == {}  # too few positives for 10 folds


def test_an_earlier_stays_condition_is_told_apart_from_this_stays() -> None:
    """`earlier_<c>` marks the stays after one that had c (of the same subject, in stay order, whatever
    the table's order); a prediction that reads an earlier stay's symptoms as this stay's weighs both."""
    truth = pl.DataFrame(
        {
            "subject_id": [2, 1, 1, 1, 2],
            "stay_index": [0, 2, 0, 1, 1],
            "af": [False] * 5,
            "opacity": [False, True, False, False, False],
            "symptom": [True, False, True, False, False],
        }
    )
    marked = with_earlier_conditions(truth).sort("subject_id", "stay_index")
    assert marked["earlier_symptom"].to_list() == [False, True, True, False, True]
    assert not marked["earlier_opacity"].any()  # a stay's own condition is not an earlier one

    rng = np.random.default_rng(4)
    n = 3000
    subjects = np.repeat(np.arange(n // 3), 3)
    stays = pl.DataFrame(
        {
            "subject_id": subjects,
            "stay_index": np.tile(np.arange(3), n // 3),
            **{c: rng.random(n) < 0.25 for c in ("af", "opacity", "symptom")},
        }
    )
    d = with_earlier_conditions(stays)
    ehr = rng.normal(size=n)
    this, earlier = d["symptom"].cast(pl.Float64).to_numpy(), d["earlier_symptom"].cast(pl.Float64).to_numpy()
    apart = earlier_weights(0.5 * (ehr + 3.5 * this), ehr, d)
    assert apart["symptom"] == pytest.approx((3.5, 0.0), abs=1e-9)
    confused = earlier_weights(0.5 * (ehr + 2.0 * this + 2.0 * earlier), ehr, d)
    assert confused["symptom"] == pytest.approx((2.0, 2.0), abs=1e-9)
    assert confused["af"] == pytest.approx((0.0, 0.0), abs=1e-9)

    # diagnose() shows both, and each prediction's following on first and on later stays apart.
    z = ehr + 3.5 * this + 3.5 * earlier * (d["stay_index"].to_numpy() > 0)
    d = d.with_columns(
        boolean_value=pl.Series(rng.random(n) < 1 / (1 + np.exp(-(ehr + 3.5 * this)))),
        visible_risk=pl.Series(ehr),
        hidden_risk=pl.Series(3.5 * this),
        zero_shot=pl.Series(1 / (1 + np.exp(-z))),
    )
    r = diagnose(d, "icu_admission", {"ehr_strength": 1.0, "note_strength": 3.5})
    assert r["stays"] == {"first": n // 3, "later": 2 * n // 3}
    first, later = r["follows by stay"]["zero_shot ~ symptom"]
    assert first > 0.75 and later < first - 0.05  # an earlier stay's symptoms blur this stay's
    assert r["earlier"]["zero_shot"]["symptom"][1] > 2.0


def test_log_odds_of_rollout_fractions_stay_finite() -> None:
    z = log_odds(np.array([0.0, 0.5, 1.0]), rollouts=20)
    assert z[1] == 0.0 and z[0] == pytest.approx(-np.log(41)) and z[2] == -z[0]
    assert np.isfinite(log_odds(np.array([0.0, 1.0]), rollouts=None)).all()


def test_decided_by_groups_rollouts_and_real_stays_by_the_first_value(
    tmp_path: Path, demo_timelines: Path
) -> None:
    store = TimelineStore(demo_timelines, "train")
    samples = task_samples(load_task("icu_mortality"), store)
    itos = store.vocab.itos
    conts = [
        [itos[t] for t in store.timeline(i)[0][e : (o + 1 if o >= 0 else None)]]  # to the outcome
        for i, e, o in samples.select("subject_index", "context_end", "outcome_pos").iter_rows()
    ]
    # a lab code of the first continuation (a quantile follows it); what follows it varies between stays
    code = next(t for c in conts for t, q in itertools.pairwise(c) if q[:1] == "Q" and q[1:].isdigit())
    first = [c[c.index(code) + 1] if code in c[:-1] else "(none)" for c in conts]
    # the token after the last `code`, as a quantile number (NaN if not one)
    after_last = [c[len(c) - 1 - c[::-1].index(code) + 1] if code in c[:-1] else "" for c in conts]
    last = np.array([float(t[1:]) if t[:1] == "Q" and t[1:].isdigit() else np.nan for t in after_last])
    task = tmp_path / "eval" / "icu_mortality"
    task.mkdir(parents=True)
    samples.select("subject_id", "prediction_time", "boolean_value").write_parquet(task / "samples.parquet")
    # Two rollouts a sample: one samples Q9 after the code (then Q10) and dies, one Q1 and leaves the ICU.
    n = samples.height
    rollouts = pl.DataFrame(
        {
            "sample": np.repeat(np.arange(n), 2),
            "positive": np.tile([True, False], n),
            "counted": np.ones(2 * n, dtype=bool),
            "tokens": [[code, "Q9", code, "Q10", "MEDS_DEATH"], [code, "Q1", "ICU_DISCHARGE"]] * n,
        }
    )
    rollouts.write_parquet(task / "rollouts.parquet")
    t = decided_by(tmp_path / "eval", "icu_mortality", store, code)
    rows = {r["value"]: r for r in t.iter_rows(named=True)}
    assert rows["Q9"]["rollouts share"] == 0.5 and rows["Q9"]["rollouts outcome"] == 1.0
    assert rows["Q1"]["rollouts share"] == 0.5 and rows["Q1"]["rollouts outcome"] == 0.0
    assert rows["Q9"]["rollouts last"] == 10.0 and rows["Q1"]["rollouts last"] == 1.0
    y = samples["boolean_value"].to_numpy()
    assert not np.isnan(last).all()
    for value in set(first):
        mine = np.array([f == value for f in first])
        assert rows[value]["real share"] == pytest.approx(mine.mean())
        assert rows[value]["real outcome"] == pytest.approx(y[mine].mean())
        known = mine & ~np.isnan(last)
        expected = last[known].mean() if known.any() else None
        assert rows[value]["real last"] == (None if expected is None else pytest.approx(expected))
    rollouts.drop("tokens").write_parquet(task / "rollouts.parquet")
    with pytest.raises(SystemExit, match="--save-tokens"):
        decided_by(tmp_path / "eval", "icu_mortality", store, code)


def test_an_ensemble_averages_the_runs_on_the_samples_they_share() -> None:
    rng = np.random.default_rng(3)
    truth = _truth(300, rng)
    t = truth["admit_us"].to_numpy()
    base = pl.DataFrame({"subject_id": truth["subject_id"], "prediction_time": t, "p_ehr": rng.random(300)})
    base = (
        base.join(truth, on="subject_id", how="left")
        .filter(pl.col("admit_us") == pl.col("prediction_time"))
        .sort("prediction_time")
    )
    signal = base["symptom"].to_numpy().astype(float)
    # Two runs that each follow the symptoms through their own noise; the second lacks its first 10 samples.
    runs = [signal + rng.normal(0, 1.5, base.height) for _ in range(2)]
    members = [
        (base.with_columns(zero_shot=pl.Series(1 / (1 + np.exp(-runs[0])))), 20),
        (base.with_columns(zero_shot=pl.Series(1 / (1 + np.exp(-runs[1]))))[10:], 20),
    ]
    samples, k = ensemble(members)
    assert k == 40 and samples.height == base.height - 10
    assert (samples.sort("prediction_time")["p_ehr"] == base["p_ehr"][10:]).all()  # the first's references
    expected = (members[0][0]["zero_shot"].to_numpy()[10:] + members[1][0]["zero_shot"].to_numpy()) / 2
    assert np.allclose(samples.sort("prediction_time")["zero_shot"].to_numpy(), expected)
    follows = [roc_auc_score(m[0]["symptom"], m[0]["zero_shot"]) for m in members]
    assert roc_auc_score(samples["symptom"], samples["zero_shot"]) > max(follows)  # their noise averages out
    assert ensemble([(members[0][0], 20), (members[1][0], None)])[1] is None  # an unknown K is not guessed

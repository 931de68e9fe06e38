import polars as pl
import pytest

from mmehr.data.timelines import TimelineStore
from mmehr.evaluate.tasks import (
    TaskTokens,
    list_tasks,
    load_task,
    task_samples,
    to_label_table,
)

SPLITS = ("train", "tuning", "held_out")


def _all_samples(root, name):
    return pl.concat([task_samples(load_task(name), TimelineStore(root, s)) for s in SPLITS])


def test_the_five_task_presets_exist():
    assert {
        "hospital_mortality",
        "icu_mortality",
        "icu_admission",
        "icu_readmission",
        "readmission_30d",
    } <= set(list_tasks())


def test_icu_mortality_has_one_sample_per_real_icu_stay(demo_timelines):
    # The MIMIC-IV demo has 140 ICU stays.
    df = _all_samples(demo_timelines, "icu_mortality")
    assert df.height == 140
    assert 0 < df["boolean_value"].sum() < 31


def test_hospital_mortality_positives_are_the_in_hospital_deaths(demo_timelines):
    # 275 admissions; 15 discharges with location DIED (4 of them with the death recorded after discharge).
    df = _all_samples(demo_timelines, "hospital_mortality")
    assert df.height == 275
    assert df["boolean_value"].sum() == 15


def test_context_ends_after_the_start_tokens_and_label_follows(demo_timelines):
    store = TimelineStore(demo_timelines, "train")
    task = load_task("icu_mortality")
    tt = TaskTokens.resolve(task, store.vocab)
    df = task_samples(task, store)
    for row in df.head(20).iter_rows(named=True):
        tokens, times = store.timeline(row["subject_index"])
        assert store.vocab.itos[tokens[row["start_pos"]]] == "ICU_ADMISSION"
        assert store.vocab.itos[tokens[row["context_end"] - 1]].startswith("ICU_UNIT//")
        assert row["prediction_time"] == times[row["context_end"] - 1]
        out = row["outcome_pos"]
        assert out >= row["context_end"]
        # Nothing between the context end and the outcome is an outcome token.
        assert not tt.outcome[tokens[row["context_end"] : out]].any()
        assert row["boolean_value"] == (store.vocab.itos[tokens[out]] == "MEDS_DEATH")


def test_readmission_horizon_counts_only_admissions_within_30_days(demo_timelines):
    df = _all_samples(demo_timelines, "readmission_30d")
    pos = df.filter(pl.col("boolean_value"))
    assert pos.height > 0
    assert ((pos["outcome_time"] - pos["prediction_time"]) <= 30 * 86_400_000_000).all()
    late = df.filter(~pl.col("boolean_value") & (pl.col("outcome_pos") >= 0))
    assert late.height > 0


def _demo_rows(root) -> pl.DataFrame:
    return pl.concat(
        [
            pl.read_parquet(f, columns=["subject_id", "time", "code", "hadm_id"])
            for f in sorted((root / "data").rglob("*.parquet"))
        ]
    )


def test_readmission_counts_a_death_within_30_days_as_positive(demo_timelines, mimic_demo_root):
    # ETHOS: the outcome of a 30-day readmission is the next admission or death; the demo has 10
    # discharges followed by a death (and no admission) within 30 days, all positive (53 -> 63 positives).
    df = _all_samples(demo_timelines, "readmission_30d")
    store = {s: TimelineStore(demo_timelines, s) for s in SPLITS}
    outcome = []
    for split in SPLITS:
        for row in task_samples(load_task("readmission_30d"), store[split]).iter_rows(named=True):
            tokens, _ = store[split].timeline(row["subject_index"])
            outcome.append(store[split].vocab.itos[tokens[row["outcome_pos"]]])
    df = df.with_columns(outcome=pl.Series(outcome))
    deaths = df.filter((pl.col("outcome") == "MEDS_DEATH") & pl.col("boolean_value"))
    assert deaths.height == 10
    assert df["boolean_value"].sum() == 63
    within = (df["outcome_time"] - df["prediction_time"]) <= 30 * 86_400_000_000
    assert (df["boolean_value"] == (df["outcome"].is_in(["HOSPITAL_ADMISSION", "MEDS_DEATH"]) & within)).all()


def test_reduced_readmission_drops_negatives_followed_for_less_than_30_days(demo_timelines):
    full = _all_samples(demo_timelines, "readmission_30d")
    reduced = _all_samples(demo_timelines, "readmission_30d_reduced")
    short = ~full["boolean_value"] & ((full["outcome_time"] - full["prediction_time"]) < 30 * 86_400_000_000)
    assert short.sum() == full.height - reduced.height == 31
    assert reduced.equals(full.filter(~short))


def test_icu_readmission_starts_at_the_first_icu_discharge_of_each_hospital_stay(
    demo_timelines, mimic_demo_root
):
    # ETHOS: one sample per hospital stay with an ICU stay (128 of the demo's 140 ICU stays), at the first
    # ICU discharge, kept also when a death or the hospital discharge shares its time.
    rows = _demo_rows(mimic_demo_root).filter(pl.col("code").str.starts_with("ICU_DISCHARGE//"))
    first = rows.group_by("subject_id", "hadm_id").agg(pl.col("time").min().cast(pl.Int64).alias("t"))
    assert first.height == 128
    ours = _all_samples(demo_timelines, "icu_readmission")
    both = first.join(
        ours, left_on=["subject_id", "t"], right_on=["subject_id", "prediction_time"], how="full"
    )
    assert both.height == ours.height == 128 and both["t"].null_count() == both["start_pos"].null_count() == 0
    assert ours["boolean_value"].sum() == 13


def test_label_table_has_the_meds_label_schema(demo_timelines):
    df = task_samples(load_task("icu_admission"), TimelineStore(demo_timelines, "held_out"))
    labels = to_label_table(df)
    assert labels.schema == pl.Schema(
        {"subject_id": pl.Int64, "prediction_time": pl.Datetime("us"), "boolean_value": pl.Boolean}
    )


def test_unknown_task_and_bad_pattern_fail_clearly(tmp_path, demo_timelines):
    with pytest.raises(FileNotFoundError, match="unknown task"):
        load_task("no_such_task")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nstart: '^ICU_ADMISSION$'\npositive: ['(unclosed']\n")
    with pytest.raises(ValueError, match="bad pattern"):
        load_task(bad)
    nomatch = tmp_path / "nomatch.yaml"
    nomatch.write_text("name: nomatch\nstart: '^NOT_A_TOKEN$'\npositive: ['^MEDS_DEATH$']\n")
    with pytest.raises(ValueError, match="matches no token"):
        task_samples(load_task(nomatch), TimelineStore(demo_timelines, "held_out"))

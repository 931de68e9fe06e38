import numpy as np
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


def test_icu_readmission_excludes_stays_ending_in_death(demo_timelines):
    store = TimelineStore(demo_timelines, "train")
    df = task_samples(load_task("icu_readmission"), store)
    death = store.vocab.encode("MEDS_DEATH")
    for row in df.iter_rows(named=True):
        tokens, times = store.timeline(row["subject_index"])
        same = np.asarray(times) == times[row["start_pos"]]
        assert death not in np.asarray(tokens)[same]


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

"""The supervised reference beside every zero-shot number (`mmehr.evaluate.reference`), and the paired
comparisons pooled over seeds: it sees exactly the model's context, never an event at or after the
prediction time, and it finds a planted signal."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from conftest import run_mmehr as mmehr
from mmehr.data.timelines import TimelineStore
from mmehr.evaluate.metrics import auroc, pooled_paired_auroc_difference
from mmehr.evaluate.reference import PooledEvents, ReferenceData, bag_of_codes, fit_references
from mmehr.evaluate.tasks import load_task, task_samples
from mmehr.modalities.store import EmbeddingStore


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """1,000 subjects; the notes carry a strong planted condition (log-odds 4), the EHR some risk."""
    root = tmp_path_factory.mktemp("reference")
    mmehr("synth", "--out", str(root / "synth"), "--subjects", "1000", "--seed", "1", "--cxr-size", "32",
          "--lab-panel", "4", "--icu-vitals-hours", "8", "--severity-signal", "3", "--ehr-strength", "1.5",
          "--ecg-strength", "0", "--cxr-strength", "0", "--note-strength", "4")  # fmt: skip
    mmehr(
        "tokenize", "--meds", str(root / "synth" / "meds"), "--out", str(root / "timelines"), "--no-progress"
    )
    mmehr("index", "--source", "note", "--root", str(root / "synth" / "note"), "--out", str(root / "events"))
    mmehr("encode", "--events", str(root / "events"), "--encoder", "note-hash", "--out", str(root / "notes"))
    return root


def test_bag_of_codes_counts_the_model_context_and_each_lab_with_its_decile(demo_timelines):
    store = TimelineStore(demo_timelines, "train")
    samples = task_samples(load_task("hospital_mortality"), store).head(5)
    x = bag_of_codes(store, samples, context_tokens=64)
    V = len(store.vocab)
    assert x.shape == (5, 11 * V)
    i, end = int(samples["subject_index"][0]), int(samples["context_end"][0])
    tokens, times = store.timeline(i)
    start = max(0, end - (64 - store.static_len))
    context = np.concatenate([store.static_context(i, int(times[start])), tokens[start:end]]).astype(int)
    counts = np.bincount(context, minlength=V)
    np.testing.assert_allclose(x[0, :V].toarray()[0], np.log1p(counts), rtol=1e-6)  # log(1 + count)
    q = {int(t): k for k, t in enumerate(store.vocab.quantile_ids)}
    pairs = [(a, q[b]) for a, b in itertools.pairwise(context) if int(b) in q]
    assert pairs  # labs with their decile in this context
    code, k = pairs[0]
    assert x[0, V + 10 * code + k] > 0  # "this lab in this decile", not just "some Q{k}"


def test_pooled_events_see_only_events_strictly_before_the_prediction_time(cohort):
    store = EmbeddingStore(cohort / "notes")
    sid, t = int(store.subject[3]), int(store.time[3])  # an event of some subject
    earlier = int((store.subject[:3] == sid).sum())  # that subject's events before it (sorted by time)
    at = pl.DataFrame({"subject_id": [sid, sid], "prediction_time": [t, t + 1]})
    x = PooledEvents(store, k=50, max_tokens=None).features(at)
    assert x[0, -1] == earlier  # an event at exactly the prediction time is not seen
    assert x[1, -1] == earlier + 1  # one microsecond later it is
    assert np.allclose(x[1, : store.d_enc], store.embedding(3).astype(np.float32).mean(0))  # the latest


def test_the_reference_finds_the_planted_note_signal(cohort):
    task = load_task("icu_admission")
    train, held = (
        TimelineStore(cohort / "timelines", "train"),
        TimelineStore(cohort / "timelines", "held_out"),
    )
    samples = task_samples(task, held)
    data = ReferenceData(context_tokens=128, modality_stores={"note": EmbeddingStore(cohort / "notes")})
    p = fit_references(train, task_samples(task, train), {"held": (held, samples)}, data)
    y = samples["boolean_value"].to_numpy()
    ehr, notes = auroc(y, p["ehr"]["held"]), auroc(y, p["ehr+note"]["held"])
    assert ehr > 0.6  # the EHR holds some risk (labs follow the acute severity)
    assert notes > ehr + 0.05  # the notes' condition, only visible in the notes, adds a lot


def test_pooled_paired_difference_over_seeds():
    rng = np.random.default_rng(0)
    y = rng.random(400) < 0.3
    groups = np.arange(400) // 2  # two samples per subject
    good = [y + rng.normal(0, 0.8, 400) for _ in range(3)]
    poor = [y + rng.normal(0, 2.5, 400) for _ in range(3)]
    d = pooled_paired_auroc_difference(y, good, poor, groups=groups, n_boot=200)
    expected = np.mean([auroc(y, a) - auroc(y, b) for a, b in zip(good, poor)])
    assert d["value"] == pytest.approx(expected) and d["seeds"] == 3
    assert 0 < d["lo"] < d["value"] < d["hi"]
    same = pooled_paired_auroc_difference(y, good, good, groups=groups, n_boot=50)
    assert same["value"] == same["lo"] == same["hi"] == 0.0

"""The synthetic cohort: valid MEDS in the MIMIC-IV style, planted signals present (and absent at strength
0), realistic timing, canaries after outcomes, --onto on the real MIMIC-IV demo."""

from __future__ import annotations

import gzip
import io
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
import wfdb
from meds import CodeMetadataSchema, DataSchema, SubjectSplitSchema
from PIL import Image
from scipy.signal import find_peaks
from sklearn.metrics import roc_auc_score

from mmehr.cli import main
from mmehr.data.synthetic import (
    ECG_NATIVE_LEADS,
    HOSP_LABS,
    SYMPTOM_PHRASES,
    MedsRows,
    SynthConfig,
    generate,
    generate_onto,
    simulate_subject,
    truth_rows,
)
from mmehr.io import read_manifest

SEC = 1_000_000


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    """80 subjects with every modality and canaries."""
    return generate(tmp_path_factory.mktemp("synth") / "out", SynthConfig(subjects=80, seed=1, canary=True))


def _meds(root: Path) -> pl.DataFrame:
    return pl.read_parquet(root / "meds" / "data" / "*" / "*.parquet").with_columns(
        pl.col("time").cast(pl.Int64).alias("t")
    )


def _truth(root: Path) -> pl.DataFrame:
    return pl.read_parquet(root / "truth.parquet")


def _ledger(root: Path) -> pl.DataFrame:
    return pl.read_parquet(root / "truth_events.parquet").join(_truth(root), on=["subject_id", "hadm_id"])


def _notes(root: Path, name: str) -> pl.DataFrame:
    with gzip.open(root / "note" / f"{name}.csv.gz") as f:
        df = pl.read_csv(io.BytesIO(f.read()), infer_schema=False)
    return df.with_columns(
        pl.col("charttime").str.to_datetime("%Y-%m-%d %H:%M:%S").cast(pl.Int64).alias("t"),
        pl.col("hadm_id").cast(pl.Int64),
        pl.col("subject_id").cast(pl.Int64),
    )


def _ecg(root: Path, event_id: str) -> np.ndarray:
    rows = pl.read_csv(root / "ecg" / "record_list.csv").filter(pl.col("study_id") == int(event_id[4:]))
    signal, fields = wfdb.rdsamp(str(root / "ecg" / rows["path"][0]))
    assert fields["sig_name"] == list(ECG_NATIVE_LEADS) and fields["fs"] == 500
    return signal  # (5000, 12), native order


def _cxr(root: Path, event_id: str) -> np.ndarray:
    dicom = event_id[4:]
    path = next((root / "cxr" / "files").rglob(f"{dicom}.jpg"))
    return np.asarray(Image.open(path))


def tallest_r_lead(signal: np.ndarray) -> np.ndarray:
    """The lead (column) with the tallest positive R waves."""
    height = np.percentile(signal, 99.5, axis=0) - np.median(signal, axis=0)
    return signal[:, int(np.argmax(height))]


def rr_irregularity(signal: np.ndarray, fs: int = 500) -> tuple[float, float]:
    """(RMSSD / mean RR, beats per minute), R peaks found by a plain threshold on the tallest lead."""
    x = tallest_r_lead(signal)
    base = np.median(x)
    peaks, _ = find_peaks(x, height=base + 0.5 * (np.percentile(x, 99.5) - base), distance=int(0.25 * fs))
    rr = np.diff(peaks) / fs
    return float(np.sqrt(np.mean(np.diff(rr) ** 2)) / rr.mean()), 60.0 / float(rr.mean())


# ----------------------------------------------------------------------------------------------------
# MEDS


def test_meds_output_validates_with_the_meds_schemas(cohort):
    shards = sorted((cohort / "meds" / "data").rglob("*.parquet"))
    assert {p.parent.name for p in shards} == {"train", "tuning", "held_out"}
    seen: dict[int, Path] = {}
    for path in shards:
        table = pq.read_table(path)
        DataSchema.validate(table)
        df = pl.from_arrow(table)
        for sid, g in df.group_by("subject_id", maintain_order=True):
            assert sid[0] not in seen, f"subject {sid[0]} in two shards"
            seen[sid[0]] = path
            times = g["time"].cast(pl.Int64)
            assert times[0] is None, "static GENDER row (null time) comes first"
            assert (times.drop_nulls().diff().drop_nulls() >= 0).all(), "rows sorted by time"
        assert (df["subject_id"].diff().drop_nulls() >= 0).all()
    splits = pq.read_table(cohort / "meds" / "metadata" / "subject_splits.parquet")
    SubjectSplitSchema.validate(splits)
    split_of = dict(zip(splits["subject_id"].to_pylist(), splits["split"].to_pylist()))
    assert len(seen) == 80 and set(split_of) == set(seen)
    assert all(seen[s].parent.name == split_of[s] for s in seen)
    assert sorted(pl.Series(list(split_of.values())).value_counts()["count"].to_list()) == [8, 8, 64]
    codes = pq.read_table(cohort / "meds" / "metadata" / "codes.parquet")
    CodeMetadataSchema.validate(codes)
    assert set(_meds(cohort)["code"].unique()) <= set(codes["code"].to_pylist())
    assert read_manifest(cohort)["counts"]["meds_rows"] == _meds(cohort).height


def test_codes_follow_the_older_mimic_iv_meds_style(cohort):
    df = _meds(cohort)
    prefixes = set(df["code"].str.split("//").list.first().unique())
    assert prefixes == {
        "GENDER", "MEDS_BIRTH", "BMI (kg/m2)", "ED_REGISTRATION", "ED_OUT", "TRANSFER_TO", "HOSPITAL_ADMISSION",
        "LAB", "MEDICATION", "ICU_ADMISSION", "ICU_DISCHARGE", "HOSPITAL_DISCHARGE", "DIAGNOSIS", "MEDS_DEATH",
    }  # fmt: skip
    assert df.filter(pl.col("code").str.starts_with("GENDER"))["time"].null_count() == 80
    adm = df.filter(pl.col("code").str.starts_with("HOSPITAL_ADMISSION//"))
    assert adm["code"].str.count_matches("//").min() == 2  # HOSPITAL_ADMISSION//{type}//{location}
    assert adm.select(pl.col("race", "insurance", "marital_status", "language").null_count()).row(0) == (
        0,
        0,
        0,
        0,
    )
    labs = df.filter(pl.col("code").str.starts_with("LAB//"))
    assert labs["code"].str.contains(r"^LAB//\d+//.+$").all() and labs["numeric_value"].null_count() == 0
    assert (
        df.filter(pl.col("code").str.starts_with("MEDICATION//"))["code"]
        .str.ends_with("//Administered")
        .all()
    )
    assert df.filter(pl.col("code").str.starts_with("ICU_ADMISSION//"))["icustay_id"].null_count() == 0
    # Diagnoses are timed at the discharge of their admission.
    dis = df.filter(pl.col("code").str.starts_with("HOSPITAL_DISCHARGE//")).select("hadm_id", dis_t="t")
    dx = df.filter(pl.col("code").str.starts_with("DIAGNOSIS//ICD//10//")).join(dis, on="hadm_id")
    assert dx.height > 0 and (dx["t"] == dx["dis_t"]).all()


def test_no_hidden_condition_leaks_into_the_ehr(cohort):
    df = _meds(cohort)
    # No atrial fibrillation (I48*) or pneumonia (J1*) codes: the conditions are modality-only.
    assert not df["code"].str.contains(r"ICD//10//(I48|J1)").any()
    # The heart-rate vital does not follow the ECG rhythm.
    hr = df.filter(pl.col("code") == "LAB//220045//bpm").join(
        _truth(cohort).select("hadm_id", "af"), on="hadm_id"
    )
    by = hr.group_by("af").agg(pl.col("numeric_value").mean()).sort("af")["numeric_value"].to_list()
    assert abs(by[1] - by[0]) < 8  # bpm; AF ECGs run ~50/min faster


def test_truth_matches_the_meds_timelines(cohort):
    df, truth = _meds(cohort), _truth(cohort)
    assert truth.height == df.filter(pl.col("code").str.starts_with("HOSPITAL_ADMISSION")).height
    died = truth.filter("hospital_death")
    deaths = df.filter(pl.col("code") == "MEDS_DEATH").select("subject_id", death_t="t")
    joined = died.join(deaths, on="subject_id")
    assert joined.height == died.height and (joined["death_us"] == joined["death_t"]).all()
    died_codes = df.filter(pl.col("code") == "HOSPITAL_DISCHARGE//DIED")
    assert set(died_codes["hadm_id"]) == set(died["hadm_id"])
    icu = df.filter(pl.col("code").str.starts_with("ICU_ADMISSION")).group_by("hadm_id").len()
    n_icu = truth.join(icu, on="hadm_id", how="left").with_columns(pl.col("len").fill_null(0))
    assert (n_icu["len"] == n_icu["n_icu_stays"]).all()
    assert truth["icu_admitted"].any() and truth["hospital_death"].any()


def test_same_seed_same_data_and_modalities_do_not_change_the_ehr(tmp_path):
    a = generate(tmp_path / "a", SynthConfig(subjects=25, seed=5, modalities=False, chunk_subjects=7))
    b = generate(tmp_path / "b", SynthConfig(subjects=25, seed=5, modalities=True, chunk_subjects=100))
    c = generate(tmp_path / "c", SynthConfig(subjects=25, seed=6, modalities=False))
    key = ["subject_id", "t", "code"]
    assert _meds(a).sort(key, maintain_order=True).equals(_meds(b).sort(key, maintain_order=True))
    assert _truth(a).equals(_truth(b))
    assert not _meds(a).equals(_meds(c))
    assert len(list((a / "meds" / "data" / "train").glob("*.parquet"))) == 4  # chunks of 7 subjects
    assert not (a / "ecg").exists() and (b / "ecg" / "record_list.csv").is_file()
    b2 = generate(tmp_path / "b2", SynthConfig(subjects=25, seed=5))
    first = pl.read_csv(b / "ecg" / "record_list.csv")["path"][0]
    assert (b / "ecg" / f"{first}.dat").read_bytes() == (b2 / "ecg" / f"{first}.dat").read_bytes()


def test_a_compact_lab_panel_shortens_timelines_and_keeps_the_outcomes(tmp_path):
    full = _meds(generate(tmp_path / "full", SynthConfig(subjects=30, seed=2, modalities=False)))
    cfg = SynthConfig(subjects=30, seed=2, modalities=False, lab_panel=4, icu_vitals_hours=8.0)
    compact = _meds(generate(tmp_path / "compact", cfg))
    labs = compact.filter(pl.col("code").str.starts_with("LAB//5"))["code"].unique().sort().to_list()
    assert labs == sorted(f"LAB//{i}//{u}" for i, u, *_ in HOSP_LABS[:4])
    assert compact.height < 0.7 * full.height
    outcome = pl.col("code").str.contains("^(ICU_ADMISSION|MEDS_DEATH|HOSPITAL_ADMISSION)")
    assert compact.filter(outcome).height > 0 and _truth(tmp_path / "compact").height > 0
    assert main(["synth", "--out", str(tmp_path / "bad"), "--lab-panel", "0", "--no-modalities"]) == 1


# ----------------------------------------------------------------------------------------------------
# Planted signal: condition -> outcome (strength), condition -> modality (rendering)


def _stays(cfg: SynthConfig, n: int) -> pl.DataFrame:
    rows, truth = MedsRows(), []
    for i in range(n):
        truth += truth_rows(simulate_subject(i, cfg, rows), None)
    return pl.DataFrame(truth)


def _log_odds_ratio(t: pl.DataFrame, flag: str, outcome: str) -> float:
    a = t.filter(pl.col(flag))[outcome].mean()
    b = t.filter(~pl.col(flag))[outcome].mean()
    return float(np.log(a / (1 - a)) - np.log(b / (1 - b)))


@pytest.mark.parametrize(
    ("flag", "knob"), [("af", "ecg_strength"), ("opacity", "cxr_strength"), ("symptom", "note_strength")]
)
def test_each_condition_raises_the_outcome_odds_by_its_strength(flag, knob):
    strong = _stays(SynthConfig(seed=3, **{knob: 2.0}), 2500)
    off = _stays(SynthConfig(seed=3, **{knob: 0.0}), 2500)
    assert _log_odds_ratio(strong, flag, "icu_admitted") > 1.2
    assert abs(_log_odds_ratio(off, flag, "icu_admitted")) < 0.25
    assert _log_odds_ratio(strong, flag, "hospital_death") > 1.0
    assert abs(_log_odds_ratio(off, flag, "hospital_death")) < 0.4


def test_ehr_visible_risk_drives_outcomes_and_lactate():
    t = _stays(SynthConfig(seed=4), 1500)
    assert roc_auc_score(t["icu_admitted"], t["visible_risk"]) > 0.65
    t0 = _stays(SynthConfig(seed=4, ehr_strength=0.0), 1500)
    assert abs(roc_auc_score(t0["icu_admitted"], t0["visible_risk"]) - 0.5) < 0.05


def test_atrial_fibrillation_shows_as_an_irregular_fast_rhythm(cohort):
    ecgs = _ledger(cohort).filter((pl.col("modality") == "ecg") & ~pl.col("canary"))
    feats = np.array([rr_irregularity(_ecg(cohort, e)) for e in ecgs["event_id"]])
    af = ecgs["af"].to_numpy()
    assert af.sum() >= 10 and (~af).sum() >= 10
    assert roc_auc_score(af, feats[:, 0]) > 0.95  # RR irregularity
    assert roc_auc_score(af, feats[:, 1]) > 0.9  # rate
    assert np.median(feats[~af, 1]) == pytest.approx(75, abs=10)
    assert np.median(feats[af, 1]) == pytest.approx(125, abs=15)


def test_a_third_party_r_peak_detector_recovers_the_rhythm(cohort):
    import neurokit2 as nk

    ecgs = _ledger(cohort).filter((pl.col("modality") == "ecg") & ~pl.col("canary")).head(30)
    cv = []
    for e in ecgs["event_id"]:
        signal = _ecg(cohort, e)
        _, info = nk.ecg_peaks(tallest_r_lead(signal), sampling_rate=500)
        rr = np.diff(info["ECG_R_Peaks"]) / 500
        cv.append(rr.std() / rr.mean())
    assert roc_auc_score(ecgs["af"].to_numpy(), cv) > 0.9


def test_twelve_leads_obey_einthoven_and_goldberger(cohort):
    e = _ledger(cohort).filter(pl.col("modality") == "ecg")["event_id"][0]
    x = _ecg(cohort, e)  # native order I, II, III, aVR, aVF, aVL
    one_adc = 1 / 200 + 1e-9
    assert np.abs(x[:, 2] - (x[:, 1] - x[:, 0])).max() <= one_adc * 1.01
    assert np.abs(x[:, 3] + (x[:, 0] + x[:, 1]) / 2).max() <= one_adc * 1.01
    assert np.abs(x[:, 4] - (x[:, 1] - x[:, 0] / 2)).max() <= one_adc * 1.01
    assert np.abs(x[:, 5] - (x[:, 0] - x[:, 1] / 2)).max() <= one_adc * 1.01
    assert 0.5 < np.abs(x).max() < 5  # mV


def test_lung_opacity_brightens_the_chest_radiograph(cohort):
    cxrs = _ledger(cohort).filter(
        (pl.col("modality") == "cxr") & ~pl.col("canary") & (pl.col("view") != "LATERAL")
    )
    brightness = [_cxr(cohort, e).mean() for e in cxrs["event_id"]]
    opacity = cxrs["opacity"].to_numpy()
    assert opacity.sum() >= 10
    assert roc_auc_score(opacity, brightness) > 0.85
    img = _cxr(cohort, cxrs["event_id"][0])
    assert img.dtype == np.uint8 and img.shape == (256, 256)


def test_symptom_phrases_appear_exactly_in_symptom_stays(cohort):
    rr = _notes(cohort, "radiology").join(_truth(cohort).select("hadm_id", "symptom"), on="hadm_id")
    rr = rr.filter(~pl.col("text").str.starts_with("CANARY"))
    has = rr["text"].map_elements(lambda s: any(p in s for p in SYMPTOM_PHRASES), return_dtype=pl.Boolean)
    assert (has == rr["symptom"]).all() and has.sum() >= 10
    # And nowhere in the EHR.
    assert not _meds(cohort)["code"].str.contains("rigors").any()


def _auroc_of_modality_features_for_icu_admission(root: Path) -> dict[str, float]:
    first = (
        _ledger(root)
        .filter(~pl.col("canary"))
        .sort("time")
        .group_by(["hadm_id", "modality", "kind"], maintain_order=True)
        .first()
    )
    out = {}
    ecg = first.filter(pl.col("modality") == "ecg")
    out["ecg"] = roc_auc_score(
        ecg["icu_admitted"], [rr_irregularity(_ecg(root, e))[0] for e in ecg["event_id"]]
    )
    cxr = first.filter((pl.col("modality") == "cxr") & (pl.col("view") == "PA"))
    out["cxr"] = roc_auc_score(cxr["icu_admitted"], [_cxr(root, e).mean() for e in cxr["event_id"]])
    notes = _notes(root, "radiology").select("note_id", "text")
    rad = first.filter(pl.col("kind") == "rad_note").with_columns(
        pl.col("event_id").str.slice(5).alias("note_id")
    )
    rad = rad.join(notes, on="note_id")
    phrase = rad["text"].map_elements(lambda s: any(p in s for p in SYMPTOM_PHRASES), return_dtype=pl.Boolean)
    out["note"] = roc_auc_score(rad["icu_admitted"], phrase.cast(pl.Int8))
    return out


def test_modality_features_predict_outcomes_only_when_the_strength_is_nonzero(tmp_path):
    # EHR strength 0 so the three hidden conditions are the only risk; features read from the files.
    def cohort_with(strength: float) -> Path:
        cfg = SynthConfig(subjects=300, seed=10, ehr_strength=0, ecg_strength=strength, cxr_strength=strength,
                          note_strength=strength)  # fmt: skip
        return generate(tmp_path / str(strength), cfg)

    strong = _auroc_of_modality_features_for_icu_admission(cohort_with(3.0))
    zero = _auroc_of_modality_features_for_icu_admission(cohort_with(0.0))
    for m in ("ecg", "cxr", "note"):
        assert strong[m] > 0.6, (m, strong)
        assert abs(zero[m] - 0.5) < 0.08, (m, zero)


# ----------------------------------------------------------------------------------------------------
# Timing


def test_pre_admission_events_fall_between_ed_arrival_and_admission(cohort):
    first = _ledger(cohort).filter(~pl.col("canary")).sort("time").group_by(["hadm_id", "kind"]).first()
    pre = first.filter(pl.col("kind").is_in(["ecg", "cxr", "rad_note"]))
    assert pre.height == 3 * _truth(cohort).height
    assert (pre["time"] < pre["admit_us"]).all()
    ed = pre.filter(pl.col("ed_us").is_not_null())
    assert ed.height > 0 and (ed["time"] > ed["ed_us"]).all()
    assert (pre["time"] > pre["admit_us"] - 9 * 3600 * SEC).all()  # ED stays last up to 8 h
    # The radiology note follows its CXR.
    wide = pre.pivot(on="kind", index="hadm_id", values="time")
    assert (wide["rad_note"] > wide["cxr"]).all()


def test_icu_events_fall_inside_the_icu_stay(cohort):
    ledger = _ledger(cohort).filter(~pl.col("canary") & (pl.col("view") == "AP"))
    assert ledger.height > 0
    assert (ledger["time"] > ledger["first_icu_us"]).all() and (ledger["time"] <= ledger["end_us"]).all()


def test_discharge_notes_are_written_at_discharge(cohort):
    ds = _notes(cohort, "discharge").join(_truth(cohort), on="hadm_id")
    assert ds.height == _truth(cohort).height
    assert ((ds["t"] - ds["discharge_us"]).abs() < SEC).all()
    assert (ds["text"].str.contains("Expired") == ds["hospital_death"]).all()


def test_canaries_come_after_every_outcome_and_reveal_it(cohort):
    canaries = _ledger(cohort).filter("canary")
    assert canaries.height == 3 * _truth(cohort).height  # one per modality per stay
    assert (canaries["time"] > canaries["end_us"]).all()
    ends = (
        _meds(cohort)
        .filter(pl.col("code").str.contains("^(MEDS_DEATH|HOSPITAL_DISCHARGE|ICU_DISCHARGE|ICU_ADMISSION)"))
        .group_by("subject_id")
        .agg(pl.col("t"))
    )
    for row in canaries.join(ends, on="subject_id").iter_rows(named=True):
        stay_times = [t for t in row["t"] if row["admit_us"] <= t <= row["end_us"]]
        assert stay_times and row["time"] > max(stay_times)
    for row in canaries.filter(pl.col("modality") == "ecg").iter_rows(named=True):
        flat = _ecg(cohort, row["event_id"]).std(axis=0).max() < 0.1
        assert flat == row["hospital_death"]
    for row in canaries.filter(pl.col("modality") == "cxr").iter_rows(named=True):
        assert (_cxr(cohort, row["event_id"]).mean() > 128) == row["hospital_death"]
    rr = _notes(cohort, "radiology").filter(pl.col("text").str.starts_with("CANARY"))
    rr = rr.join(_truth(cohort).select("hadm_id", "hospital_death"), on="hadm_id")
    assert (rr["text"].str.contains("expired") == rr["hospital_death"]).all()


# ----------------------------------------------------------------------------------------------------
# --onto the real MIMIC-IV demo


@pytest.fixture(scope="module")
def onto(tmp_path_factory, mimic_demo_root) -> Path:
    return generate_onto(
        tmp_path_factory.mktemp("onto") / "out", mimic_demo_root, SynthConfig(seed=2, canary=True)
    )


def test_onto_aligns_modality_events_to_real_admissions(onto, mimic_demo_root):
    real = pl.read_parquet(
        mimic_demo_root / "data" / "*" / "*.parquet", columns=["subject_id", "time", "code", "hadm_id"]
    )
    real = real.with_columns(pl.col("time").cast(pl.Int64).alias("t"))
    adm = real.filter(pl.col("code").str.starts_with("HOSPITAL_ADMISSION")).select("hadm_id", real_admit="t")
    dis = real.filter(pl.col("code").str.starts_with("HOSPITAL_DISCHARGE")).select("hadm_id", real_dis="t")
    truth = _truth(onto).join(adm, on="hadm_id").join(dis, on="hadm_id")
    assert truth.height == 275 == adm.height
    assert (truth["admit_us"] == truth["real_admit"]).all() and (
        truth["discharge_us"] == truth["real_dis"]
    ).all()
    assert read_manifest(onto)["meds_root"] == str(mimic_demo_root.resolve())
    assert not (onto / "meds").exists()
    ledger = _ledger(onto).filter(~pl.col("canary"))
    first = ledger.sort("time").group_by(["hadm_id", "kind"]).first()
    pre = first.filter(pl.col("kind").is_in(["ecg", "cxr", "rad_note"]))
    assert pre.height == 3 * 275 and (pre["time"] < pre["admit_us"]).all()
    ds = _notes(onto, "discharge").join(truth, on="hadm_id")
    assert ds.height == 275 and ((ds["t"] - ds["real_dis"]).abs() < SEC).all()
    during = ledger.filter(pl.col("hospital_death") & (pl.col("kind") != "discharge_note"))
    assert during.height > 0 and (during["time"] <= during["death_us"]).all()  # nothing acquired after death


def test_onto_canaries_follow_real_deaths_and_the_signal_follows_real_outcomes(onto, mimic_demo_root):
    real = pl.read_parquet(
        mimic_demo_root / "data" / "*" / "*.parquet", columns=["subject_id", "time", "code"]
    )
    deaths = real.filter(pl.col("code") == "MEDS_DEATH").select(
        "subject_id", death=pl.col("time").cast(pl.Int64)
    )
    truth = _truth(onto)
    died = truth.filter("hospital_death").join(deaths, on="subject_id")
    assert died.height == truth["hospital_death"].sum() >= 10
    canaries = _ledger(onto).filter("canary").join(deaths, on="subject_id", how="left")
    assert (
        canaries.filter(pl.col("hospital_death"))["time"] > canaries.filter(pl.col("hospital_death"))["death"]
    ).all()
    assert (canaries["time"] > canaries["end_us"]).all()
    # Hidden conditions are more common in stays with bad real outcomes.
    bad = pl.col("hospital_death") | pl.col("icu_admitted")
    for flag in ("af", "opacity", "symptom"):
        rates = truth.group_by(bad.alias("bad")).agg(pl.col(flag).mean()).sort("bad")[flag].to_list()
        assert rates[1] > rates[0] + 0.15, flag


# ----------------------------------------------------------------------------------------------------
# CLI


def test_cli_synth_writes_and_reports(tmp_path, capsys):
    assert (
        main(["synth", "--out", str(tmp_path / "o"), "--subjects", "12", "--no-modalities", "--seed", "3"])
        == 0
    )
    assert "wrote" in capsys.readouterr().out
    manifest = read_manifest(tmp_path / "o")
    assert manifest["counts"]["subjects"] == 12 and manifest["modalities"] == []
    assert main(["synth", "--out", str(tmp_path / "p"), "--onto", str(tmp_path), "--no-modalities"]) == 1
    assert "cannot be combined" in capsys.readouterr().err
    assert main(["synth", "--out", str(tmp_path / "q"), "--onto", str(tmp_path / "nowhere")]) == 1
    assert "no MEDS data" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------
# The options that shape how much the EHR shows (the demo's cohort)


def test_history_shows_frailty_before_the_first_admission(tmp_path):
    base = SynthConfig(subjects=60, seed=5, modalities=False)
    plain = _meds(generate(tmp_path / "plain", base))
    hist = _meds(generate(tmp_path / "hist", SynthConfig(**{**base.__dict__, "history": True})))
    first_admit = (
        hist.filter(pl.col("code").str.starts_with("HOSPITAL_ADMISSION"))
        .group_by("subject_id")
        .agg(pl.col("time").min().alias("admit"))
    )
    early_dx = hist.join(first_admit, on="subject_id").filter(
        pl.col("code").str.starts_with("DIAGNOSIS//") & (pl.col("time") < pl.col("admit"))
    )
    assert early_dx.height > 20  # a problem list before any stay
    early_plain = plain.join(first_admit, on="subject_id").filter(
        pl.col("code").str.starts_with("DIAGNOSIS//") & (pl.col("time") < pl.col("admit"))
    )
    assert early_plain.height == 0
    rows, cfg = MedsRows(), SynthConfig(seed=5, history=True)
    first = [simulate_subject(i, cfg, rows)[0] for i in range(1500)]
    r = np.corrcoef([s.frailty for s in first], [s.age for s in first])[0, 1]
    assert r > 0.7  # age tracks frailty closely (without `history`: about 0.45)


def test_severity_signal_sharpens_how_labs_follow_the_acute_severity():
    def lactate_auroc(signal: float) -> float:
        cfg = SynthConfig(seed=6, severity_signal=signal, lab_panel=4)
        rows, truth = MedsRows(), []
        for i in range(400):
            truth += truth_rows(simulate_subject(i, cfg, rows), None)
        meds = rows.to_frame().filter(pl.col("code") == "LAB//50813//mmol/L")  # lactate
        first = meds.group_by("hadm_id").agg(pl.col("numeric_value").first())
        t = pl.DataFrame(truth).join(first, on="hadm_id")
        return roc_auc_score(t["acute"] > 0, t["numeric_value"])

    assert lactate_auroc(3.0) > lactate_auroc(1.0) + 0.05 and lactate_auroc(3.0) > 0.9


def test_icu_triage_draws_vitals_before_each_icu_admission_and_drives_icu_death(tmp_path):
    cfg = SynthConfig(subjects=150, seed=7, modalities=False, icu_triage=1.5)
    meds = _meds(generate(tmp_path / "tri", cfg))
    icu = meds.filter(pl.col("code").str.starts_with("ICU_ADMISSION")).select("subject_id", icu_time="time")
    vitals = meds.filter(pl.col("code") == "LAB//220045//bpm").select("subject_id", "time")
    before = icu.join(vitals, on="subject_id").filter(
        (pl.col("time") < pl.col("icu_time")) & (pl.col("time") >= pl.col("icu_time") - pl.duration(hours=2))
    )
    assert (
        before.select("subject_id", "icu_time").unique().height == icu.unique().height
    )  # every ICU admission
    # The truth keeps the first ICU stay's deterioration (benchmarks/diagnose_zero_shot.py reads it).
    truth = pl.read_parquet(tmp_path / "tri" / "truth.parquet")
    assert (truth["first_icu_deterioration"].is_not_null() == truth["icu_admitted"]).all()
    icu_stays = truth.filter("icu_admitted")
    assert abs(icu_stays["first_icu_deterioration"].std() - 1.0) < 0.3
    high = icu_stays["first_icu_deterioration"] > 0
    assert icu_stays.filter(high)["icu_death"].mean() > icu_stays.filter(~high)["icu_death"].mean()
    off = _stays(SynthConfig(seed=7, death_offset=-1.5), 2000)
    lower = _stays(SynthConfig(seed=7), 2000)
    assert (
        off["hospital_death"].mean() < 0.7 * lower["hospital_death"].mean()
    )  # death_offset < 0: fewer deaths

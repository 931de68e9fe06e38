"""The `ethos` tokenizer preset on the real MIMIC-IV demo: ETHOS-ARES's vocabulary (ICD-10 via GEMs,
ATC, its groups, dropped codes, DRG//UNKNOWN, blood pressure, BMI in the static context), and task labels
equal to the default preset's."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from mmehr.data.timelines import TimelineStore
from mmehr.data.tokenizer.codes import atc, icd_cm, icd_pcs
from mmehr.evaluate.tasks import load_task, task_samples

SPLITS = ("train", "tuning", "held_out")


@pytest.fixture(scope="module")
def raw(mimic_demo_root: Path) -> pl.DataFrame:
    return pl.concat(
        [
            pl.read_parquet(f, columns=["subject_id", "time", "code", "numeric_value", "text_value"])
            for f in sorted((mimic_demo_root / "data").rglob("*.parquet"))
        ]
    )


@pytest.fixture(scope="module")
def timelines(ethos_timelines: Path) -> dict[int, list[str]]:
    """subject id -> its decoded timeline, every split."""
    out = {}
    for split in SPLITS:
        store = TimelineStore(ethos_timelines, split)
        for i, sid in enumerate(store.subject_ids):
            out[int(sid)] = store.vocab.decode(store.timeline(i)[0])
    return out


def test_icd9_codes_become_icd10_category_characters_and_suffix():
    # 428.0 (congestive heart failure, unspecified) -> GEM I50.9; a single GEM target is kept whole
    assert icd_cm("DIAGNOSIS//ICD//9//4280") == ("ICD//CM//I50", "ICD//CM//3-6//9")
    assert icd_cm("DIAGNOSIS//ICD//10//S72001A") == ("ICD//CM//S72", "ICD//CM//3-6//001", "ICD//CM//SFX//A")
    # 39.61 (extracorporeal circulation) -> ICD-10-PCS 5A1221Z, one token per character
    assert icd_pcs("PROCEDURE//ICD//9//3961") == tuple(f"ICD//PCS//{c}" for c in "5A1221Z")
    assert icd_cm("DIAGNOSIS//ICD//9//NOT_A_CODE") == ()  # no GEM target: dropped, as ETHOS
    # an administered drug: three tokens per ATC code (heparin has two); other eMAR events are dropped
    assert atc("MEDICATION//Heparin//Administered")[:3] == ("ATC//B01", "ATC//4//A", "ATC//SFX//B01")
    assert atc("MEDICATION//Heparin//Not Given") == () and atc("MEDICATION//START//Heparin") == ()


def test_the_demo_has_no_source_diagnosis_procedure_or_medication_codes_left(ethos_timelines):
    vocab = TimelineStore(ethos_timelines, "train").vocab.itos
    assert not [t for t in vocab if re.match(r"^(DIAGNOSIS|PROCEDURE|MEDICATION)//", t)]
    dropped = r"^(INFUSION_|SUBJECT_WEIGHT_AT_INFUSION|SUBJECT_FLUID_OUTPUT|Weight|Height|eGFR|TRANSFER_TO)"
    assert not [t for t in vocab if re.match(dropped, t)]
    for prefix, n in (("ICD//CM//", 100), ("ICD//PCS//", 20), ("ATC//", 100), ("DRG//", 50)):
        assert sum(t.startswith(prefix) for t in vocab) > n
    assert len([t for t in vocab if re.match(r"^LAB//[^Q]", t)]) == 200  # the 200 most frequent labs


def test_a_subjects_icd9_heart_failure_is_tokenized_as_icd10(raw, timelines):
    sid = raw.filter(pl.col("code") == "DIAGNOSIS//ICD//9//4280")["subject_id"][0]
    tokens = timelines[int(sid)]
    i = tokens.index("ICD//CM//I50")
    assert tokens[i + 1] == "ICD//CM//3-6//9"


def test_admissions_carry_ethos_types_and_insurance(raw, timelines):
    n_adm = 0
    for tokens in timelines.values():
        for i, t in enumerate(tokens):
            if t == "HOSPITAL_ADMISSION":
                n_adm += 1
                assert tokens[i + 1] in {
                    f"ADMISSION_TYPE//{x}" for x in ("EMERGENCY", "SCHEDULED", "OBSERVATION")
                }
                assert tokens[i + 2] in {"INSURANCE//Medicare", "INSURANCE//Medicaid", "INSURANCE//Other"}
    assert n_adm == raw.filter(pl.col("code").str.starts_with("HOSPITAL_ADMISSION//")).height == 275


def test_every_discharge_is_followed_by_its_diagnoses_and_one_drg(raw, timelines):
    # HCFA DRGs only (APR DRGs dropped); a stay without one gets DRG//UNKNOWN.
    disch = raw.filter(pl.col("code").str.starts_with("HOSPITAL_DISCHARGE//"))
    hcfa = raw.filter(pl.col("code").str.starts_with("DRG//HCFA//")).select("subject_id", "time").unique()
    unknown = disch.join(hcfa, on=["subject_id", "time"], how="anti").height
    counts = {"DRG//UNKNOWN": 0, "known": 0}
    for tokens in timelines.values():
        for i, t in enumerate(tokens):
            if t != "HOSPITAL_DISCHARGE":
                continue
            assert tokens[i + 1].startswith("DISCHARGE_LOCATION//")
            j = i + 2
            while tokens[j].startswith("ICD//CM//"):
                j += 1
            # a DRG never seen in train reads <UNK> (held-out and tuning subjects)
            assert tokens[j].startswith("DRG//") or tokens[j] == "<UNK>", tokens[i : j + 1]
            counts["DRG//UNKNOWN" if tokens[j] == "DRG//UNKNOWN" else "known"] += 1
    assert counts["DRG//UNKNOWN"] == unknown > 0
    assert counts["known"] + counts["DRG//UNKNOWN"] == disch.height
    locations = {t for tokens in timelines.values() for t in tokens if t.startswith("DISCHARGE_LOCATION//")}
    assert (
        "DISCHARGE_LOCATION//HEALTHCARE_FACILITY" in locations and "DISCHARGE_LOCATION//UNKNOWN" in locations
    )
    assert not locations & {"DISCHARGE_LOCATION//REHAB", "DISCHARGE_LOCATION//SKILLED NURSING FACILITY"}


def test_blood_pressure_has_a_systolic_and_a_diastolic_decile(raw, ethos_timelines):
    store = TimelineStore(ethos_timelines, "train")
    edges = json.loads((ethos_timelines / "stats.json").read_text())["value_edges"]
    sbp, dbp = edges["VITAL//BLOOD_PRESSURE//SBP"], edges["VITAL//BLOOD_PRESSURE//DBP"]
    i = next(
        i for i in range(len(store)) if "VITAL//BLOOD_PRESSURE" in store.vocab.decode(store.timeline(i)[0])
    )
    tokens, times = store.timeline(i)
    tokens = store.vocab.decode(tokens)
    k = tokens.index("VITAL//BLOOD_PRESSURE")
    text = raw.filter(
        (pl.col("subject_id") == int(store.subject_ids[i]))
        & pl.col("code").str.starts_with("Blood Pressure")
        & (pl.col("time").cast(pl.Int64) == int(times[k]))
    )["text_value"][0]
    s, d = (float(x) for x in text.split("/"))
    assert tokens[k + 1 : k + 3] == [f"Q{1 + sum(e < s for e in sbp)}", f"Q{1 + sum(e < d for e in dbp)}"]


def test_static_context_has_ethos_race_groups_marital_status_and_bmi(ethos_timelines):
    store = TimelineStore(ethos_timelines, "train")
    assert store.vocab.static_fields == ["gender", "race", "marital", "bmi"]
    races = {t for t in store.vocab.itos if t.startswith("RACE//")}
    assert races <= {
        f"RACE//{r}" for r in ("WHITE", "BLACK", "HISPANIC", "ASIAN", "OTHER", "UNKNOWN", "<UNK>")
    }
    seen_bmi = 0
    for i in range(len(store)):
        _, times = store.timeline(i)
        ctx = store.vocab.decode(store.static_context(i, int(times[-1])))
        assert len(ctx) == 6 and ctx[3].startswith("BMI//")
        seen_bmi += ctx[3] != "BMI//<UNK>"
        # one race per patient: the same token whenever it is known
        first = store.vocab.decode(store.static_context(i, int(times[0])))[1]
        assert first in {"RACE//<UNK>", ctx[1]}
    assert seen_bmi > 40


@pytest.mark.parametrize(
    "task", ["hospital_mortality", "icu_mortality", "icu_admission", "icu_readmission", "readmission_30d"]
)
def test_task_labels_equal_the_default_presets(task, ethos_timelines, demo_timelines):
    def labels(root):
        df = pl.concat([task_samples(load_task(task), TimelineStore(root, s)) for s in SPLITS])
        return df.select("subject_id", "prediction_time", "boolean_value", "outcome_time").sort(
            "subject_id", "prediction_time"
        )

    ours, default = labels(ethos_timelines), labels(demo_timelines)
    assert ours.height == default.height > 100
    assert ours["boolean_value"].to_list() == default["boolean_value"].to_list()
    assert np.array_equal(ours["prediction_time"].to_numpy(), default["prediction_time"].to_numpy())
    # the same outcome events (a timeline's end can differ: the ethos preset drops some last events)
    pos = ours["boolean_value"].to_numpy()
    assert (
        pos.any() and (ours["outcome_time"].to_numpy()[pos] == default["outcome_time"].to_numpy()[pos]).all()
    )


def test_race_is_one_known_value_per_patient_and_insurance_and_bmi_follow_ethos(tmp_path):
    from datetime import datetime, timedelta

    from mmehr.data.meds import write_data_shard, write_metadata
    from mmehr.data.tokenize import tokenize

    t0 = datetime(2150, 1, 1)
    rows = []
    for sid in (1, 2):
        rows += [
            (sid, None, "GENDER//F", None, None, None, None),
            (sid, t0, "HOSPITAL_ADMISSION//EW EMER.//EMERGENCY ROOM", None, None, "UNABLE TO OBTAIN", None),
            (
                sid,
                t0 + timedelta(hours=1),
                "BMI (kg/m2)",
                None,
                "4649.4",
                None,
                None,
            ),  # out of range: dropped
            (sid, t0 + timedelta(hours=2), "BMI (kg/m2)", None, "24.5", None, None),
            (sid, t0 + timedelta(days=2), "HOSPITAL_DISCHARGE//REHAB", None, None, None, None),
            (
                sid,
                t0 + timedelta(days=90),
                "HOSPITAL_ADMISSION//ELECTIVE//CLINIC",
                None,
                None,
                "ASIAN - CHINESE",
                "Medicare",
            ),
        ]
    df = pl.DataFrame(
        rows,
        schema={
            "subject_id": pl.Int64,
            "time": pl.Datetime("us"),
            "code": pl.String,
            "numeric_value": pl.Float32,
            "text_value": pl.String,
            "race": pl.String,
            "insurance": pl.String,
        },
        orient="row",
    )
    root = tmp_path / "meds"
    write_data_shard(df, root / "data" / "0.parquet")
    write_metadata(
        root,
        sorted(set(df["code"])),
        {"dataset_name": "MIMIC-IV"},
        pl.DataFrame({"subject_id": [1, 2], "split": ["train", "train"]}),
    )
    manifest = tokenize(root, tmp_path / "tok", progress=False)
    assert manifest["preset"] == "ethos"
    store = TimelineStore(tmp_path / "tok", "train")
    tokens = store.vocab.decode(store.timeline(0)[0])
    assert tokens[:3] == [
        "HOSPITAL_ADMISSION",
        "ADMISSION_TYPE//EMERGENCY",
        "INSURANCE//UNKNOWN",
    ]  # no insurance
    assert tokens.count("BMI") == 1  # the implausible BMI is dropped
    i = tokens.index("HOSPITAL_DISCHARGE")
    assert tokens[i : i + 3] == [
        "HOSPITAL_DISCHARGE",
        "DISCHARGE_LOCATION//HEALTHCARE_FACILITY",
        "DRG//UNKNOWN",
    ]
    j = len(tokens) - tokens[::-1].index("HOSPITAL_ADMISSION") - 1
    assert tokens[j : j + 3] == ["HOSPITAL_ADMISSION", "ADMISSION_TYPE//SCHEDULED", "INSURANCE//Medicare"]
    _, times = store.timeline(0)
    # one race per patient, the known one (ASIAN, recorded later) preferred to UNKNOWN, from the first admission
    at_first, at_bmi = int(times[0]), int(times[tokens.index("BMI")])
    ctx = store.vocab.decode(store.static_context(0, at_bmi))
    assert (
        ctx[1] == "RACE//ASIAN" and store.vocab.decode(store.static_context(0, at_first))[1] == "RACE//ASIAN"
    )
    assert (
        ctx[3].startswith("BMI//Q")
        and store.vocab.decode(store.static_context(0, at_first))[3] == "BMI//<UNK>"
    )

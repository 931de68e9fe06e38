"""The configuration of a synthetic cohort, the identifier ranges, and small time/probability helpers."""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta

EPOCH = datetime(1970, 1, 1)

SUBJECT_ID0 = 10_000_000
HADM_ID0, ICUSTAY_ID0, ECG_STUDY0, CXR_STUDY0 = 20_000_000, 30_000_000, 40_000_000, 50_000_000
MAX_ADMISSIONS = 6
PREVALENCE = 0.25


@dataclass
class SynthConfig:
    """Everything that shapes a synthetic cohort; saved in the manifest."""

    subjects: int = 1000
    seed: int = 0
    modalities: bool = True
    canary: bool = False
    ehr_strength: float = 1.0  # weight of the EHR-visible risk (0.5 frailty + acute)
    death_offset: float = 0.0  # added to the log-odds of every in-hospital death (keeps prevalence in hand)
    severity_signal: float = 1.0  # multiplies how far labs and vitals move with the acute severity
    ecg_strength: float = 2.0  # log-odds effect of atrial fibrillation (ECG only) on every outcome
    cxr_strength: float = 2.0  # log-odds effect of a lung opacity (CXR only)
    note_strength: float = 2.0  # log-odds effect of sepsis-like symptoms (note text only)
    cxr_size: int = 256  # CXR JPEG width = height, pixels
    lab_panel: int = 10  # labs per draw (ED, mornings): the first N of HOSP_LABS, most acute-sensitive first
    icu_vitals_hours: float = 4.0  # hours between ICU vital-sign rounds
    history: bool = False  # frailty shows in age and in a problem list recorded before the first admission
    # > 0: each ICU admission follows a deterioration d ~ N(0, 1), seen in vitals and labs 0.5-2 h before it,
    # that adds icu_triage * d to the log-odds of dying in that ICU stay (0: no deterioration, no such draw)
    icu_triage: float = 0.0
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

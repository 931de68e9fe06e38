"""The EHR simulator: one subject's MEDS rows (older MIMIC-IV MEDS code style) and hospital stays.

Per subject: frailty f ~ N(0, 1). Age at first admission ~ N(62 + 8 f, 15) clipped to [18, 95];
chronic diagnoses (hypertension, diabetes, CKD, heart failure, COPD, ...) each with probability
sigmoid(b + f); 1 + Poisson(0.35 + 0.25 max(f, 0)) admissions (at most 6), months apart.

Per stay: acute severity a ~ N(0, 1) and the hidden conditions af, opacity, symptom (package docstring).
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
Labs worsen over the last 36 h before a death (realistic, EHR-visible deterioration).

Options that shape how much the EHR shows (all off by default; the demo's cohort turns them on):
    severity_signal  labs and vitals move severity_signal x their coefficient per unit of acute severity
    history          age ~ N(60 + 12 f, 8), and the chronic diagnoses recorded at a visit 1 month to 2
                     years before the first admission (so frailty shows before any stay)
    icu_triage W     each ICU admission follows a deterioration d ~ N(0, 1): vitals and labs 0.5-2 h
                     before the transfer show severity + d, and W d is added to the ICU death log-odds
    death_offset     added to the log-odds of every in-hospital death (keeps prevalence in hand)
"""

from __future__ import annotations

import math
from datetime import datetime

import numpy as np
import polars as pl

from mmehr.data.synthetic.codes import (
    ACUTE_DX,
    CHRONIC_DX,
    DIRECT_ADMISSIONS,
    DISCHARGE_LOCATIONS,
    DRUGS,
    ED_ADMISSION_TYPES,
    HOSP_LAB_CODES,
    HOSP_LABS,
    ICU_UNITS,
    MARITAL,
    RACES,
    VALUE_RANGE,
    VITAL_CODES,
    VITALS,
    WARDS,
)
from mmehr.data.synthetic.config import (
    HADM_ID0,
    ICUSTAY_ID0,
    MAX_ADMISSIONS,
    PREVALENCE,
    SUBJECT_ID0,
    SynthConfig,
    _round,
    _sigmoid,
    from_us,
    to_us,
)
from mmehr.data.synthetic.stays import IcuStay, Stay
from mmehr.units import DAY_US, HOUR_US, MINUTE_US

# Intercepts of the outcome model (see the module docstring)
C_ICU, C_ICU_DEATH, C_ICU_READMIT, C_WARD_DEATH, C_POST_ICU_DEATH = -1.2, -3.1, -3.2, -4.8, -4.4


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


# ----------------------------------------------------------------------------------------------------
# The EHR simulator (one subject)


def _measure(rng, specs, acute: float, frailty: float, signal: float = 1.0) -> list[float]:
    """One draw of each measurement in `specs`: its mean shifted by `signal` x its coefficient x the acute
    severity, and by its frailty coefficient, plus noise (log-normal ones on the log scale)."""
    out = []
    for itemid, _unit, _name, mean, sd, lognormal, ka, kf in specs:
        ka = ka * signal
        if lognormal:
            v = math.exp(math.log(mean) + ka * acute + kf * frailty + sd * rng.normal())
        else:
            v = mean + ka * acute + kf * frailty + sd * rng.normal()
        lo, hi = VALUE_RANGE.get(itemid, (0.05 * mean, math.inf))
        out.append(round(min(max(v, lo), hi), 2))
    return out


def _severity(acute: float, t: int, admit: int, death: int | None) -> float:
    """Acute severity at time t: recovers over ~3 days, worsens over the last 36 h before a death."""
    s = acute * math.exp(-(t - admit) / (3 * DAY_US))
    if death is not None:
        s += 2.0 * min(max(1 - (death - t) / (36 * HOUR_US), 0.0), 1.0)
    return s


def simulate_subject(i: int, cfg: SynthConfig, rows: MedsRows) -> list[Stay]:
    """Append subject i's MEDS rows to `rows`; return its stays. Depends only on (cfg.seed, i)."""
    rng = np.random.default_rng([cfg.seed, i])
    sid = SUBJECT_ID0 + i
    frailty = float(rng.normal())
    female = bool(rng.random() < 0.5)
    # With `history`, frailty shows clearly in age and in diagnoses recorded before the first admission.
    age_mean, age_sd = (60 + 12 * frailty, 8) if cfg.history else (62 + 8 * frailty, 15)
    age0 = int(np.clip(rng.normal(age_mean, age_sd), 18, 95))
    year0 = int(rng.integers(2110, 2190))
    t = (
        to_us(datetime(year0, 1, 1))
        + int(rng.integers(0, 360)) * DAY_US
        + int(rng.integers(0, 24 * 60)) * MINUTE_US
    )
    birth_year = year0 - age0
    race = str(rng.choice(RACES[0], p=RACES[1]))
    marital = str(rng.choice(MARITAL[0], p=MARITAL[1]))
    language = "ENGLISH" if rng.random() < 0.9 else "?"
    chronic = [code for code, _d, b in CHRONIC_DX if rng.random() < _sigmoid(b + frailty)]
    rows.add(sid, None, "GENDER//F" if female else "GENDER//M")
    rows.add(sid, to_us(datetime(birth_year, 1, 1)), "MEDS_BIRTH")
    if cfg.history and chronic:  # an earlier visit's problem list, 1 month to 2 years before
        t_hist = _round(t - (30 + rng.uniform(0, 700)) * DAY_US, MINUTE_US)
        for code in chronic:
            rows.add(sid, t_hist, f"DIAGNOSIS//ICD//10//{code}")

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
        t = (
            stay.discharge
            + int((10 + rng.exponential(200)) * DAY_US)
            + int(rng.integers(0, 24 * 60)) * MINUTE_US
        )
    if stays[-1].death is None and rng.random() < _sigmoid(-3.5 + frailty):
        rows.add(sid, stays[-1].discharge + int((10 + rng.exponential(150)) * DAY_US), "MEDS_DEATH")
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
        ed = _round(t0, MINUTE_US)
        ed_out = ed + _round(rng.uniform(2.5, 8) * HOUR_US, MINUTE_US)
        admit = ed_out - _round(rng.uniform(0, 30) * MINUTE_US, MINUTE_US)
        adm_type = f"{rng.choice(ED_ADMISSION_TYPES[0], p=ED_ADMISSION_TYPES[1])}//EMERGENCY ROOM"
    else:
        ed = ed_out = None
        admit = _round(t0, MINUTE_US)
        adm_type = str(rng.choice(DIRECT_ADMISSIONS[0], p=DIRECT_ADMISSIONS[1]))

    # Outcomes.
    los = _round((1 + rng.lognormal(1.0, 0.6) + max(acute, 0.0)) * DAY_US, MINUTE_US)
    icu: list[IcuStay] = []
    death = None
    t = admit
    if rng.random() < _sigmoid(C_ICU + risk):
        t = admit + _round(rng.uniform(2, 30) * HOUR_US, MINUTE_US)
        for j in range(2):
            icu_los = _round((0.5 + rng.lognormal(0.7, 0.6)) * DAY_US, 1_000_000)
            unit = str(rng.choice(ICU_UNITS))
            d = float(rng.normal()) if cfg.icu_triage else 0.0  # the deterioration behind this admission (SD)
            if rng.random() < _sigmoid(C_ICU_DEATH + cfg.death_offset + risk + cfg.icu_triage * d):
                death = t + _round(rng.uniform(0.2, 0.95) * icu_los, MINUTE_US)
                icu.append(IcuStay(ICUSTAY_ID0 + i * 16 + k * 2 + j, t, death, unit, d))
                break
            icu.append(IcuStay(ICUSTAY_ID0 + i * 16 + k * 2 + j, t, t + icu_los, unit, d))
            t = t + icu_los
            if j == 1 or rng.random() >= _sigmoid(C_ICU_READMIT + risk):
                break
            t = t + _round(rng.uniform(12, 72) * HOUR_US, MINUTE_US)
        if death is None:
            ward_time = _round(rng.uniform(1, 4) * DAY_US, MINUTE_US)
            if rng.random() < _sigmoid(C_POST_ICU_DEATH + cfg.death_offset + risk):
                death = t + _round(rng.uniform(0.2, 1.0) * ward_time, MINUTE_US)
            discharge = death if death is not None else t + ward_time
        else:
            discharge = death
    else:
        if rng.random() < _sigmoid(C_WARD_DEATH + cfg.death_offset + risk):
            death = admit + _round(rng.uniform(0.3, 1.0) * los, MINUTE_US)
        discharge = death if death is not None else admit + los

    if death is not None:
        location = "DIED"
    else:
        p = np.array([0.55, 0.25, 0.12, 0.08]) * np.exp(np.array([0, 0.3, 0.8, 0.5]) * frailty)
        location = str(rng.choice(DISCHARGE_LOCATIONS, p=p / p.sum()))

    # Rows: arrival.
    if rng.random() < 0.5:
        rows.add(sid, _round(t0, DAY_US), "BMI (kg/m2)", text=f"{rng.normal(28, 5):.1f}")
    if via_ed:
        rows.add(sid, ed, "ED_REGISTRATION")
        rows.add(sid, ed, "TRANSFER_TO//ED//Emergency Department", hadm=hadm)
        tv = ed + _round(rng.uniform(5, 20) * MINUTE_US, MINUTE_US)
        rows.add_many(
            sid, [tv] * 4, VITAL_CODES, _measure(rng, VITALS, acute, frailty, cfg.severity_signal), hadm, None
        )
        tl = ed + _round(rng.uniform(30, 90) * MINUTE_US, MINUTE_US)
    else:
        tl = admit + _round(rng.uniform(30, 120) * MINUTE_US, MINUTE_US)
    labs, lab_codes = HOSP_LABS[: cfg.lab_panel], HOSP_LAB_CODES[: cfg.lab_panel]
    sev = _severity(acute, tl, admit, death)
    rows.add_many(
        sid, [tl] * len(labs), lab_codes, _measure(rng, labs, sev, frailty, cfg.severity_signal), hadm, None
    )
    rows.add(sid, admit, f"HOSPITAL_ADMISSION//{adm_type}", hadm=hadm, admission=admission_info)
    if via_ed:
        rows.add(sid, ed_out, "ED_OUT")
    rows.add(sid, ed_out or admit, f"TRANSFER_TO//admit//{ward}", hadm=hadm)

    # Daily morning labs and medications until the end of the stay.
    day = _round(admit, DAY_US) + DAY_US + 6 * HOUR_US
    drugs = rng.choice(DRUGS, size=3, replace=False)
    while day < discharge:
        tl = day + _round(rng.uniform(0, 90) * MINUTE_US, MINUTE_US)
        if tl < discharge:
            sev = _severity(acute, tl, admit, death)
            vals = _measure(rng, labs, sev, frailty, cfg.severity_signal)
            rows.add_many(sid, [tl] * len(labs), lab_codes, vals, hadm, None)
        for drug in drugs:
            tm = day + _round(rng.uniform(2, 14) * HOUR_US, MINUTE_US)
            if tm < discharge:
                rows.add(sid, tm, f"MEDICATION//{drug}//Administered", hadm=hadm)
        day += DAY_US

    # ICU stays: (with icu_triage: the vitals and labs of the deterioration that triggers the transfer,
    # 0.5-2 h before it, which also raises the risk of dying in that ICU stay), admission, vitals every
    # cfg.icu_vitals_hours, discharge.
    for s in icu:
        if cfg.icu_triage:
            tt = max(s.start - _round(rng.uniform(0.5, 2) * HOUR_US, MINUTE_US), admit + MINUTE_US)
            sev = _severity(acute, tt, admit, death) + s.deterioration
            rows.add_many(
                sid,
                [tt] * 4,
                VITAL_CODES,
                _measure(rng, VITALS, sev, frailty, cfg.severity_signal),
                hadm,
                None,
            )
            rows.add_many(
                sid,
                [tt] * len(labs),
                lab_codes,
                _measure(rng, labs, sev, frailty, cfg.severity_signal),
                hadm,
                None,
            )
        rows.add(sid, s.start, f"TRANSFER_TO//transfer//{s.unit}", hadm=hadm)
        rows.add(sid, s.start, f"ICU_ADMISSION//{s.unit}", hadm=hadm, icu=s.icustay_id)
        tv = s.start + _round(rng.uniform(10, 60) * MINUTE_US, MINUTE_US)
        while tv < s.end:
            sev = _severity(acute, tv, admit, death)
            vals = _measure(rng, VITALS, sev, frailty, cfg.severity_signal)
            rows.add_many(sid, [tv] * 4, VITAL_CODES, vals, hadm, s.icustay_id)
            tv += round(cfg.icu_vitals_hours * HOUR_US)
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

"""Modality event schedule (shared by the generator and --onto).

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
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mmehr.data.synthetic.config import _round
from mmehr.data.synthetic.stays import Stay
from mmehr.units import HOUR_US, MINUTE_US


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
    if stay.ed is not None and stay.ed < admit - 2 * MINUTE_US:
        w = admit - stay.ed
        t_ecg = stay.ed + min(0.15 * w, rng.uniform(5, 30) * MINUTE_US)
        t_cxr = stay.ed + min(0.4 * w, rng.uniform(30, 120) * MINUTE_US)
        t_note = t_cxr + min(0.5 * (admit - t_cxr), rng.uniform(20, 90) * MINUTE_US)
    else:
        t_ecg = admit - rng.uniform(2, 6) * HOUR_US
        t_cxr = admit - rng.uniform(1, 2) * HOUR_US
        t_note = t_cxr + rng.uniform(15, 45) * MINUTE_US
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
                ModalityEvent(
                    "ecg", _round(s.start + min(rng.uniform(0.5, 3) * HOUR_US, 0.5 * dur), sec), stay
                )
            )
        t_icu_cxr = _round(s.start + min(rng.uniform(1, 6) * HOUR_US, 0.6 * dur), ms)
        ev.append(ModalityEvent("cxr", t_icu_cxr, stay, view="AP"))
        t_n = t_icu_cxr + min(rng.uniform(30, 90) * MINUTE_US, 0.5 * max(end - t_icu_cxr, 0))
        ev.append(ModalityEvent("rad_note", _round(max(t_n, t_icu_cxr + sec), sec), stay, view="AP"))
    ev.append(ModalityEvent("discharge_note", _round(stay.discharge, sec), stay))
    if canary:
        t_c = _round(stay.end, sec) + _round(rng.uniform(1, 10) * MINUTE_US, sec)
        for kind in ("ecg", "cxr", "rad_note"):
            ev.append(ModalityEvent(kind, t_c, stay, view="AP" if kind == "cxr" else "", canary=True))
    return ev

"""Stays: what both the generator and --onto hand to the modality writers, and their truth rows."""

from __future__ import annotations

from dataclasses import dataclass, field

import polars as pl


@dataclass
class IcuStay:
    icustay_id: int
    start: int  # µs
    end: int  # µs (ICU discharge, or death)
    unit: str
    deterioration: float = 0.0  # with icu_triage: the deterioration that triggered the admission


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


TRUTH_SCHEMA = {
    "subject_id": pl.Int64, "hadm_id": pl.Int64, "stay_index": pl.Int32, "split": pl.String,
    "ed_us": pl.Int64, "admit_us": pl.Int64, "discharge_us": pl.Int64, "end_us": pl.Int64, "death_us": pl.Int64,
    "first_icu_us": pl.Int64, "n_icu_stays": pl.Int32, "first_icu_deterioration": pl.Float64,
    "frailty": pl.Float64, "acute": pl.Float64,
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
                # with icu_triage: the deterioration seen in the labs before the first ICU admission
                "first_icu_deterioration": s.icu[0].deterioration if s.icu else None,
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

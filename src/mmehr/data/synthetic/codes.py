"""The vocabulary of the older MIMIC-IV MEDS style (as in the MIMIC-IV demo): code tables and descriptions."""

from __future__ import annotations

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


def _lab_codes(specs) -> list[str]:
    return [f"LAB//{itemid}//{unit}" for itemid, unit, *_ in specs]


HOSP_LAB_CODES = _lab_codes(HOSP_LABS)
VITAL_CODES = _lab_codes(VITALS)


def code_descriptions() -> dict[str, str]:
    """Human-readable descriptions for the generator's code families (codes.parquet)."""
    d = {"MEDS_BIRTH": "Birth", "MEDS_DEATH": "Death", "GENDER//F": "Female", "GENDER//M": "Male"}
    for itemid, unit, name, *_ in HOSP_LABS + VITALS:
        d[f"LAB//{itemid}//{unit}"] = name
    for code, desc, _ in CHRONIC_DX + ACUTE_DX:
        d[f"DIAGNOSIS//ICD//10//{code}"] = desc
    return d

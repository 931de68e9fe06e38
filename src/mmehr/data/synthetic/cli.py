"""`mmehr synth`: write a synthetic cohort, or with --onto only modality files aligned to a MEDS dataset."""

from __future__ import annotations

import argparse

from mmehr.data.synthetic.codes import HOSP_LABS
from mmehr.data.synthetic.cohort import generate
from mmehr.data.synthetic.config import SynthConfig
from mmehr.data.synthetic.onto import generate_onto


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
        "--death-offset", type=float, default=d.death_offset, help="added to the log-odds of every death"
    )
    parser.add_argument(
        "--severity-signal",
        type=float,
        default=d.severity_signal,
        help="how far labs and vitals move with the acute severity (multiplier)",
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

    parser.add_argument(
        "--history",
        action="store_true",
        help="frailty shows in age and in a problem list recorded before the first admission",
    )
    parser.add_argument(
        "--icu-triage",
        type=float,
        default=d.icu_triage,
        metavar="W",
        help="each ICU admission follows a deterioration seen in vitals and labs 0.5-2 h before it, adding "
        "W x its size (SD) to the log-odds of dying in that ICU stay (default 0: none)",
    )


def run(args: argparse.Namespace) -> int:
    cfg = SynthConfig(
        subjects=args.subjects if args.subjects is not None else SynthConfig.subjects,
        seed=args.seed,
        modalities=not args.no_modalities,
        canary=args.canary,
        ehr_strength=args.ehr_strength,
        severity_signal=args.severity_signal,
        death_offset=args.death_offset,
        ecg_strength=args.ecg_strength,
        cxr_strength=args.cxr_strength,
        note_strength=args.note_strength,
        cxr_size=args.cxr_size,
        chunk_subjects=args.chunk_subjects,
        lab_panel=args.lab_panel,
        icu_vitals_hours=args.icu_vitals_hours,
        icu_triage=args.icu_triage,
        history=args.history,
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

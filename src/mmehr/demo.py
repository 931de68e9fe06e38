"""`mmehr demo`: every stage on the embedded data, then a report.

1. `mmehr synth`: a synthetic cohort in MIMIC-IV's MEDS code style with ECG (WFDB), CXR (JPEG) and
   note (CSV) files in the MIMIC formats, with outcome signal planted in each modality (see
   `mmehr.data.synthetic`). Synthetic rather than the 100 real MIMIC-IV demo subjects: those hold 12
   held-out ICU stays with one ICU death, too few for any AUROC to mean anything (the real demo is the
   tokenizer's and the tasks' test fixture instead).
2. `mmehr tokenize`, 3. `mmehr index` per modality, 4. `mmehr encode` with the offline encoders:
   MiniLM (real pretrained weights) for notes, the weight-free patch encoders for ECG and CXR.
5. `mmehr ablate` on a two-run grid: EHR-only and all three modalities, same config and seed, each
   trained then evaluated on four tasks with K rollouts; 6. `mmehr report`.

Every stage is skipped when its output is already complete, so an interrupted demo resumes. `--fast`
shrinks everything to show each stage working in a few minutes; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from mmehr.experiments import run_stage
from mmehr.io import check_output, is_complete, mark_output, write_json

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
TASKS = ["hospital_mortality", "icu_mortality", "icu_admission", "icu_readmission"]
ENCODERS = {"ecg": "ecg-patch", "cxr": "cxr-patch", "note": "minilm"}


@dataclass
class DemoSize:
    subjects: int
    max_steps: int
    warmup_steps: int
    eval_every: int
    rollouts: int
    max_samples: int | None
    tuning_samples: int
    max_new_tokens: int


FULL = DemoSize(
    subjects=2000,
    max_steps=2000,
    warmup_steps=100,
    eval_every=500,
    rollouts=20,
    max_samples=200,
    tuning_samples=100,
    max_new_tokens=256,
)
FAST = DemoSize(
    subjects=160,
    max_steps=30,
    warmup_steps=5,
    eval_every=15,
    rollouts=4,
    max_samples=12,
    tuning_samples=12,
    max_new_tokens=64,
)
# The demo cohort: a compact lab panel and 8-hourly ICU vitals (about 130 tokens per stay instead of 225:
# more outcomes per training token) and a strong planted signal in every modality (log-odds 4 per
# condition); see the README for what this does and does not show.
SYNTH = ["--lab-panel", "4", "--icu-vitals-hours", "8"] + [
    arg for m in ("ecg", "cxr", "note") for arg in (f"--{m}-strength", "4")
]


def demo(out: str | Path, fast: bool = False, subjects: int | None = None, steps: int | None = None) -> Path:
    size = dataclasses.replace(
        FAST if fast else FULL,
        **({"subjects": subjects} if subjects else {}),
        **({"max_steps": steps} if steps else {}),
    )
    out = Path(out).resolve()
    check_output(out, "demo")  # a rerun resumes its own output; anything else there is refused
    mark_output(out, "demo")
    seconds: dict[str, float] = {}

    def stage(name: str, done: Path, *args: str) -> None:
        if is_complete(done):
            print(f"[demo] {name}: already complete in {done}", flush=True)
            return
        print(f"[demo] {name}", flush=True)
        t0 = time.perf_counter()
        run_stage(*args)
        seconds[name] = time.perf_counter() - t0

    synth, timelines = out / "synth", out / "timelines"
    stage(
        "synth", synth, "synth", "--out", str(synth), "--subjects", str(size.subjects), "--seed", "0", *SYNTH
    )
    stage("tokenize", timelines, "tokenize", "--meds", str(synth / "meds"), "--out", str(timelines))
    for modality, encoder in ENCODERS.items():
        events, store = out / "events" / modality, out / "stores" / modality
        stage(
            f"index {modality}",
            events,
            "index",
            "--source",
            modality,
            "--root",
            str(synth / modality),
            "--out",
            str(events),
        )
        stage(
            f"encode {modality} ({encoder})",
            store,
            "encode",
            "--events",
            str(events),
            "--encoder",
            encoder,
            "--out",
            str(store),
        )

    paths = [f"data.timelines={timelines}"] + [
        f"data.modalities.{m}.store={out / 'stores' / m}" for m in ENCODERS
    ]
    sizes = [
        f"optim.max_steps={size.max_steps}",
        f"optim.warmup_steps={size.warmup_steps}",
        f"run.eval_every={size.eval_every}",
        f"run.checkpoint_every={size.eval_every}",
    ]
    grid = {
        "base": str(CONFIGS / "demo.yaml"),
        "tasks": TASKS,
        "rollouts": size.rollouts,
        "max_samples": size.max_samples,
        "seeds": [0],
        "set": paths + sizes,
        "runs": {
            "ehr_only": [f"data.modalities.{m}.enabled=false" for m in ENCODERS],
            "multimodal": [],
        },
        "knockout": [],  # each knock-out costs a whole evaluation: see configs/grids/ for them
        "tables": [
            {"title": "EHR only vs EHR + ECG + CXR + notes", "runs": ["ehr_only", "multimodal"], "task": None}
        ],
        "evaluate_args": [
            "--max-new-tokens",
            str(size.max_new_tokens),
            "--tuning-samples",
            str(size.tuning_samples),
        ],
    }
    grid_path = out / "grid.yaml"
    grid_path.write_text(yaml.safe_dump(grid, sort_keys=False))
    experiments = out / "experiments"
    t0 = time.perf_counter()
    run_stage("ablate", "--grid", str(grid_path), "--out", str(experiments))
    seconds["train + evaluate"] = time.perf_counter() - t0
    write_json(
        out / "demo.json",
        {
            "mode": "fast (shows every stage working; the numbers mean nothing)" if fast else "full",
            "subjects": size.subjects,
            "training steps per model": size.max_steps,
            "rollouts per sample": size.rollouts,
            "samples per task (at most)": size.max_samples,
            "encoders": ENCODERS,
            "stage seconds (this invocation)": seconds,
        },
    )
    run_stage("report", str(out))
    report = out / "report.md"
    print(f"[demo] report: {report} (and {report.with_suffix('.html')})", flush=True)
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="demo_out", help="output directory (rerun to resume)")
    parser.add_argument(
        "--fast", action="store_true", help="tiny sizes: every stage in a few minutes, no result"
    )
    parser.add_argument("--subjects", type=int, help="cohort size (default: 2000, --fast: 160)")
    parser.add_argument("--steps", type=int, help="training steps per model")


def run(args: argparse.Namespace) -> int:
    demo(args.out, fast=args.fast, subjects=args.subjects, steps=args.steps)
    return 0

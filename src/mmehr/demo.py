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
import math
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from mmehr.evaluate.metrics import recorded_sampled_auroc
from mmehr.experiments import run_stage
from mmehr.io import check_output, is_complete, mark_output, write_json

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
STUDY_GRID = CONFIGS / "grids" / "demo-study.yaml"
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
    max_new_tokens=512,  # the safety cap: a hospital stay can run past 256 generated tokens
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
# The demo cohort, shaped like the paper's setting: the EHR at each prediction time carries most of the
# risk (labs and vitals follow the acute severity closely, frailty shows in age and a problem list, an ICU
# admission follows a deterioration seen in triage labs), and each modality's hidden condition adds a
# moderate signal (log-odds 3.5) visible before admission. A compact lab panel and 8-hourly ICU vitals
# keep a stay short in tokens. README: what this does and does not show.
SYNTH = [
    "--lab-panel", "4", "--icu-vitals-hours", "8", "--history", "--severity-signal", "3",
    "--ehr-strength", "2.5", "--icu-triage", "1.5", "--death-offset", "-1.5",
    *(arg for m in ("ecg", "cxr", "note") for arg in (f"--{m}-strength", "3.5")),
]  # fmt: skip


def demo(
    out: str | Path,
    fast: bool = False,
    subjects: int | None = None,
    steps: int | None = None,
    study: bool = False,
    only: list[str] | None = None,
) -> Path:
    """Run the demo into `out` (resuming what is complete); with `study`, also the paper's two tables with
    3 seeds (configs/grids/demo-study.yaml), or only the study's runs named in `only`. Returns the report's
    path."""
    if only and not study:
        raise ValueError("--only picks runs of the study grid: use it with --study")
    t_start = time.perf_counter()
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

    if study:
        stage(
            "encode note (note-hash, for Table 2)",
            out / "stores" / "note-hash",
            "encode",
            "--events",
            str(out / "events" / "note"),
            "--encoder",
            "note-hash",
            "--out",
            str(out / "stores" / "note-hash"),
        )
    grid = demo_grid(out, size, study)
    grid_path = out / ("study-grid.yaml" if study else "grid.yaml")
    grid_path.write_text(yaml.safe_dump(grid, sort_keys=False))
    experiments = out / "experiments"
    t0 = time.perf_counter()
    # The demo's two runs train side by side like the study's (one torch thread each on 2 cores): a seed-0
    # run is then the same run whether the demo or the study trained it, and the demo is no slower
    # (without dropout: 17.5 min on a clean clone against 18 min for the two runs one after the other on 2
    # threads). The last run to finish evaluates on both cores (experiments.CoreShare).
    jobs = ["--jobs", "2"]
    picked = ["--only", *only] if only else []
    run_stage("ablate", "--grid", str(grid_path), "--out", str(experiments), *jobs, *picked)
    seconds["study: train + evaluate" if study else "train + evaluate"] = time.perf_counter() - t0
    write_json(
        out / ("study.json" if study else "demo.json"),
        {
            "mode": "fast (shows every stage working; the numbers mean nothing)" if fast else "full",
            "commit": source_version(),
            "subjects": size.subjects,
            "cohort": " ".join(SYNTH),
            "training steps per model": size.max_steps,
            "seeds": grid["seeds"],
            "rollouts per sample": size.rollouts,
            "samples per task (at most)": size.max_samples,
            "encoders": ENCODERS,
            "stage seconds (this invocation)": seconds,
        },
    )
    run_stage("report", str(out))
    report = out / "report.md"
    print(results_table(experiments, grid), flush=True)
    print(f"[demo] {source_version()}; {time.perf_counter() - t_start:.0f} s in this invocation", flush=True)
    print(f"[demo] report: {report} (and {report.with_suffix('.html')})", flush=True)
    return report


def demo_grid(out: Path, size: DemoSize, study: bool) -> dict:
    """configs/grids/demo-study.yaml with the demo's paths and sizes; without `study`, its two runs
    ehr_only and all_three at seed 0 (the study reuses them)."""
    grid = yaml.safe_load(STUDY_GRID.read_text())
    grid["base"] = str(CONFIGS / "demo.yaml")
    paths = [f"data.timelines={out / 'timelines'}"] + [
        f"data.modalities.{m}.store={out / 'stores' / m}" for m in ENCODERS
    ]
    sizes = [
        f"optim.max_steps={size.max_steps}",
        f"optim.warmup_steps={size.warmup_steps}",
        f"run.eval_every={size.eval_every}",
        f"run.checkpoint_every={size.eval_every}",
    ]
    grid["set"] = paths + sizes + list(grid.get("set") or [])
    grid["runs"] = {
        name: [o.replace("{out}", str(out)) for o in overrides] for name, overrides in grid["runs"].items()
    }
    grid["rollouts"], grid["max_samples"] = size.rollouts, size.max_samples
    grid["evaluate_args"] = [
        "--max-new-tokens",
        str(size.max_new_tokens),
        "--tuning-samples",
        str(size.tuning_samples),
    ]
    if not study:
        grid["runs"] = {k: grid["runs"][k] for k in ("ehr_only", "all_three")}
        grid["seeds"] = [0]
        grid["tasks"] = TASKS
        grid["compare"] = [["all_three", "ehr_only"]]
        grid["tables"] = [
            {"title": "EHR only vs EHR + ECG + CXR + notes", "runs": ["ehr_only", "all_three"], "task": None}
        ]
    return grid


def _ci(v: dict, signed: bool = False) -> str:
    """value [lo, hi]; n/a where the value could not be computed (e.g. one class among the samples)."""
    f = "+.3f" if signed else ".3f"
    finite = [x is not None and math.isfinite(x) for x in (v.get("value"), v.get("lo"), v.get("hi"))]
    if not finite[0]:
        return "n/a"
    if not all(finite):
        return f"{v['value']:{f}}"
    return f"{v['value']:{f}} [{v['lo']:{f}}, {v['hi']:{f}}]"


def source_version() -> str:
    """The commit this code runs from (with `+changes` when the checkout differs from it), or the version."""
    from mmehr import __version__

    root = Path(__file__).resolve().parents[2]

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        commit = git("rev-parse", "--short=12", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        return f"mmehr {__version__} (not a git checkout)"
    return f"mmehr {__version__}, commit {commit}{' +changes' if dirty else ''}"


def results_table(experiments: Path, grid: dict) -> str:
    """The demo's result in one table: per task, the supervised references and zero-shot AUROC of EHR-only
    and all three modalities (mean over the seeds run), and the paired difference. After a reference's CI:
    its AUROC with its probabilities sampled like the zero-shot ones (K rollouts; `metrics.sampled_auroc`)."""
    import json

    def metrics(run: str, seed: int, task: str) -> dict | None:
        path = experiments / "runs" / run / f"seed{seed}" / "eval" / task / "metrics.json"
        return json.loads(path.read_text()) if path.is_file() else None

    tables = experiments / "tables.json"
    comparisons = json.loads(tables.read_text()).get("comparisons", []) if tables.is_file() else []
    lines = [
        "",
        "| task | reference EHR | reference EHR + all | zero-shot EHR-only | zero-shot all three | all three - EHR-only (paired) |",
        "|---|---|---|---|---|---|",
    ]
    for task in grid["tasks"]:
        rows = {
            run: [m for s in grid["seeds"] if (m := metrics(run, s, task))]
            for run in ("ehr_only", "all_three")
        }
        if not rows["ehr_only"] or not rows["all_three"]:
            continue
        ref = rows["all_three"][0].get("reference") or {}

        def cell(ms: list[dict]) -> str:
            if len(ms) == 1:
                return _ci(ms[0]["metrics"]["auroc"])
            v = [m["metrics"]["auroc"]["value"] for m in ms]
            if any(x is None for x in v):
                return "n/a"
            return f"{sum(v) / len(v):.3f} (seeds: {', '.join(f'{x:.3f}' for x in v)})"

        def reference(name: str, ref: dict = ref) -> str:
            if name not in ref:
                return "n/a"
            sampled = recorded_sampled_auroc(ref[name])
            if not sampled:
                return _ci(ref[name]["metrics"]["auroc"])
            return f"{_ci(ref[name]['metrics']['auroc'])}; {sampled['value']:.3f}"

        pair = ("all_three", "ehr_only", task)
        d = next((c for c in comparisons if (c["a"], c["b"], c["task"]) == pair), None)
        diff = _ci(d, signed=True) if d else "n/a"
        lines.append(
            f"| {task} | {reference('ehr')} | {reference('ehr+all')} | {cell(rows['ehr_only'])} | {cell(rows['all_three'])} | {diff} |"
        )
    lines.append(
        "\nAUROC [95% CI]; after a reference's CI, its AUROC had its probabilities been estimated like the"
        "\nzero-shot ones, from the same number of sampled futures per sample: what the rollouts alone cost."
    )
    return "\n".join(lines) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="demo_out", help="output directory (rerun to resume)")
    parser.add_argument(
        "--fast", action="store_true", help="tiny sizes: every stage in a few minutes, no result"
    )
    parser.add_argument("--subjects", type=int, help="cohort size (default: 2000, --fast: 160)")
    parser.add_argument("--steps", type=int, help="training steps per model")
    parser.add_argument(
        "--study",
        action="store_true",
        help="also the paper's Tables 1 and 2 with 3 seeds (configs/grids/demo-study.yaml; reuses the demo)",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        metavar="RUN",
        help="with --study: only these runs of the study grid (e.g. ehr_only all_three: the demo's pair, 3 seeds)",
    )


def run(args: argparse.Namespace) -> int:
    demo(args.out, fast=args.fast, subjects=args.subjects, steps=args.steps, study=args.study, only=args.only)
    return 0

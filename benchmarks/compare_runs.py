"""Paired AUROC differences between runs of different grids (a grid's own `compare` pairs only its runs).

    python benchmarks/compare_runs.py demo_out/fusion-dropout/runs/all_three_fusion_dropout0 \
        demo_out/experiments/runs/ehr_only demo_out/experiments/runs/all_three \
        --seeds 0 1 2 --task hospital_mortality icu_mortality icu_admission

Each argument is a run directory holding `seed<k>/eval`; the first run is compared with each of the others
on the same samples, seed by seed (`ablation_tables.paired_difference`): AUROC(first) - AUROC(other), the
mean over the seeds both finished, with the seed-pooled subject-bootstrap 95% CI, as the grids' tables
give it. Both runs must have been evaluated on the same samples (same cohort, task and sample cap).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mmehr.ablation_tables import paired_difference


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "runs", nargs="+", type=Path, help="run directories (seed<k>/eval inside); the first vs each"
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--task", nargs="+", required=True)
    args = parser.parse_args()
    first, *others = args.runs
    if not others:
        parser.error("name at least two runs")
    print("| a | b | task | seeds | AUROC(a) - AUROC(b) [95% CI] |\n|---|---|---|---|---|")
    for other in others:
        evals = [(first / f"seed{s}" / "eval", other / f"seed{s}" / "eval") for s in args.seeds]
        for task in args.task:
            d = paired_difference(evals, task)
            cell = (
                "no seed evaluated by both"
                if d is None
                else f"{d['value']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}]"
            )
            print(f"| {first.name} | {other.name} | {task} | {d['seeds'] if d else 0} | {cell} |")


if __name__ == "__main__":
    main()

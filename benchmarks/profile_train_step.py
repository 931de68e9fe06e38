"""Where a training step's time goes: `python benchmarks/profile_train_step.py [--out DIR]`.

gpu_check.py's model and synthetic batch (paper sizes on CUDA, tiny on CPU): the step time of EHR-only,
`mean` and `latent` (the Perceiver's media keys/values folded into the queries and not), then torch's
profiler over three latent steps: the kernels by device time and the operators by host time. On one H200
(README, "On a GPU") the latent step was bound by the host: about 2,200 kernel launches per step and the
device busy for about 40 % of it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_check as g  # it puts this checkout's src on the path


def seconds_per_step(check: g.Check, step, steps: int = 5) -> float:
    for _ in range(2):
        step()
    check.sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    check.sync()
    return (time.perf_counter() - t0) / steps


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, help="also write the report to DIR/profile_train_step.txt")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per case")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    check = g.Check(args.out or Path("."), device, "paper" if cuda else "tiny", float("inf"))
    lines = [f"device {device}, sizes {check.size}, torch {torch.__version__}"]
    for mode, fold in (("ehr_only", None), ("mean", None), ("latent", True), ("latent", False)):
        ms = 1000 * seconds_per_step(check, g.train_step(check, mode, fold=fold)[1], args.steps)
        lines.append(
            f"{mode}{'' if fold is None else f', media keys/values folded: {fold}'}: {ms:.1f} ms/step"
        )
        print(lines[-1], flush=True)
    printed = len(lines)  # the header is not printed; the timings were, as they came
    step = g.train_step(check, "latent")[1]
    seconds_per_step(check, step, 1)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(3):
            step()
        check.sync()
    table = prof.key_averages()
    if cuda:
        lines += [
            "",
            "latent, 3 steps, by device time:",
            table.table(sort_by="cuda_time_total", row_limit=30),
        ]
    lines += ["", "latent, 3 steps, by host time:", table.table(sort_by="cpu_time_total", row_limit=20)]
    report = "\n".join(lines) + "\n"
    print("\n".join(lines[printed:]))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "profile_train_step.txt").write_text(report)
    return report


if __name__ == "__main__":
    main()

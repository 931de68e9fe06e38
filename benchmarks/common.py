"""Shared measuring helpers for the benchmarks."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time
from pathlib import Path


def peak_rss_mb_of_command(cmd: list[str], env: dict | None = None) -> tuple[float, float, str]:
    """Run `cmd` as a child process; return (wall seconds, peak RSS MB of the child, stdout)."""
    wrapper = (
        "import resource, subprocess, sys, time;"
        "t=time.perf_counter(); p=subprocess.run(sys.argv[1:], capture_output=True, text=True);"
        "dt=time.perf_counter()-t;"
        "r=resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss/1024;"
        "sys.stdout.write(p.stdout); sys.stderr.write(p.stderr);"
        "print(f'@@BENCH {dt} {r} {p.returncode}')"
    )
    proc = subprocess.run(
        [sys.executable, "-c", wrapper, *cmd],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
    )
    last = [ln for ln in proc.stdout.splitlines() if ln.startswith("@@BENCH")][-1].split()
    dt, rss, rc = float(last[1]), float(last[2]), int(last[3])
    if rc != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({rc}):\n{proc.stderr[-3000:]}")
    return dt, rss, proc.stdout


def self_peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def mmehr_exe() -> str:
    return str(Path(sys.executable).with_name("mmehr"))


class Timer:
    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0


def matmul_flops(n: int = 1024, reps: int = 5, clock=time.perf_counter) -> float:
    """FLOP/s of an n x n fp32 matmul on this machine now: the practical limit a model is compared to.

    `clock=time.process_time` measures CPU time, which a busy shared machine disturbs less.
    """
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t0 = clock()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (clock() - t0)


def run_cases_in_subprocesses(script: str, cases, args: list[str], threads: int) -> list[dict]:
    """Run `python script CASE *args` once per case, each in a fresh process with `threads` torch threads
    (so one case's allocations and thread pools never colour the next); each prints one JSON line last."""
    import json

    rows = []
    for case in cases:
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        out = subprocess.run([sys.executable, script, case, *args], capture_output=True, text=True, env=env)
        if out.returncode != 0:
            raise RuntimeError(f"case {case} failed:\n{out.stderr[-3000:]}")
        rows.append({"case": case, **json.loads(out.stdout.strip().splitlines()[-1])})
    return rows

"""`mmehr index` per source as a whole process: events per second (wall clock, including start-up) and
peak memory, on the modality roots of a synthetic cohort written by `mmehr synth` (MIMIC formats).
The cohort is cached under $MMEHR_BENCH_CACHE (default: <tmp>/mmehr-bench-cache).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from common import mmehr_exe, peak_rss_mb_of_command

CACHE = Path(os.environ.get("MMEHR_BENCH_CACHE", Path(tempfile.gettempdir()) / "mmehr-bench-cache"))


def _cohort(subjects: int) -> Path:
    root = CACHE / f"synth-{subjects}"
    if not (root / "manifest.json").is_file():
        peak_rss_mb_of_command([mmehr_exe(), "synth", "--out", str(root), "--subjects", str(subjects)])
    return root


def run(quick: bool) -> list[dict]:
    subjects = 100 if quick else 2_000
    cohort = _cohort(subjects)
    rows = []
    for source in ("ecg", "cxr", "note"):
        out = Path(tempfile.mkdtemp(prefix="mmehr-bench-index-")) / "idx"
        try:
            cmd = [
                mmehr_exe(),
                "index",
                "--source",
                source,
                "--root",
                str(cohort / source),
                "--out",
                str(out),
            ]
            wall, rss, _ = peak_rss_mb_of_command(cmd)
            manifest = json.loads((out / "manifest.json").read_text())
            rows.append(
                {
                    "case": f"{source} ({subjects} synthetic subjects)",
                    "events": manifest["counts"]["events"],
                    "wall_s": wall,
                    "events_per_s": manifest["counts"]["events"] / wall,
                    "events_per_s_in_stage": manifest["events_per_s"],
                    "peak_rss_mb": rss,
                }
            )
        finally:
            shutil.rmtree(out.parent, ignore_errors=True)
    return rows

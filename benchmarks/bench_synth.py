"""`mmehr synth` as a whole process: subjects per second (wall clock, including start-up), MEDS rows
per second, peak memory (child-process peak RSS) and output size, without modalities (EHR only, up to
100,000 subjects: memory must stay bounded by the chunk size) and with all three modalities (the demo's
setting: ~1,000-3,000 subjects must take a minute or two on 2 cores).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from common import mmehr_exe, peak_rss_mb_of_command


def _size_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e6


def _case(name: str, subjects: int, extra: list[str]) -> dict:
    out = Path(tempfile.mkdtemp(prefix="mmehr-bench-synth-")) / "out"
    try:
        cmd = [mmehr_exe(), "synth", "--out", str(out), "--subjects", str(subjects), "--seed", "0", *extra]
        wall, rss, _ = peak_rss_mb_of_command(cmd)
        counts = json.loads((out / "manifest.json").read_text())["counts"]
        row = {
            "case": name,
            "subjects": subjects,
            "wall_s": wall,
            "subjects_per_s": subjects / wall,
            "meds_rows_per_s": counts["meds_rows"] / wall,
            "peak_rss_mb": rss,
            "output_mb": _size_mb(out),
        }
        for k in ("ecg", "cxr", "radiology_note", "discharge_note"):
            if k in counts:
                row[f"{k}_files"] = counts[k]
        return row
    finally:
        shutil.rmtree(out.parent, ignore_errors=True)


def run(quick: bool) -> list[dict]:
    if quick:
        return [
            _case("ehr only", 2_000, ["--no-modalities"]),
            _case("ehr + ecg/cxr/notes", 100, []),
        ]
    return [
        _case("ehr only", 10_000, ["--no-modalities"]),
        _case("ehr only", 100_000, ["--no-modalities"]),
        _case("ehr + ecg/cxr/notes", 1_000, []),
        _case("ehr + ecg/cxr/notes + canary", 1_000, ["--canary"]),
    ]

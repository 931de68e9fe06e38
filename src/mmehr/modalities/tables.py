"""The source tables of MIMIC modality roots (`record_list.csv`, the CXR metadata, the note CSVs): read
with their required columns checked, and their dates and times parsed to µs since the epoch.

A table holding bytes that are not UTF-8 is read anyway: the rows holding them are flagged (`NOT_UTF8`),
the indexers of `mmehr.modalities.sources` skip them with a reason, and a warning names the file and
the rows, never their text.
"""

from __future__ import annotations

import sys
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import polars as pl

from mmehr.units import DAY_US

EPOCH = datetime(1970, 1, 1)
NOT_UTF8 = "_not_utf8"  # read_csv_checked's flag of rows whose bytes were not UTF-8


def find_file(root: Path, names: list[str]) -> Path | None:
    """The first of `names` that is a file under `root`, or None."""
    for name in names:
        if (root / name).is_file():
            return root / name
    return None


def read_csv_checked(path: Path, required: list[str]) -> pl.DataFrame:
    """Read a CSV (optionally gzipped) as strings; raise ValueError naming the file and missing columns.

    Bytes that are not UTF-8 do not reject the file: it is read with them replaced, the rows holding
    them are flagged in a `NOT_UTF8` column (the indexers skip them, counted) and a warning names the
    file and the rows (never their text)."""
    try:
        try:
            df = pl.read_csv(path, infer_schema=False)
        except pl.exceptions.ComputeError as e:
            if "utf-8" not in str(e).lower():
                raise
            df = pl.read_csv(path, infer_schema=False, encoding="utf8-lossy")
            df = df.with_columns(
                pl.any_horizontal(pl.all().str.contains("\ufffd", literal=True))
                .fill_null(False)
                .alias(NOT_UTF8)
            )
    except Exception as e:  # polars raises several error types; its message may quote a note, so not shown
        raise ValueError(f"{path}: cannot be read as CSV ({type(e).__name__})") from e
    if NOT_UTF8 in df.columns:
        rows = df.with_row_index("row", offset=1).filter(pl.col(NOT_UTF8))["row"].to_list()
        shown = ", ".join(map(str, rows[:5])) + (", ..." if len(rows) > 5 else "")
        print(f"warning: {path}: {len(rows)} row(s) hold bytes that are not UTF-8 (data row {shown}); "
              "skipped, counted in skipped.parquet as 'not UTF-8'", file=sys.stderr)  # fmt: skip
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: missing required column(s) {missing}; found {df.columns}")
    return df


def datetime_us(col: pl.Expr) -> pl.Expr:
    """'YYYY-MM-DD HH:MM:SS[.f]' (or a bare date) -> int64 µs since the epoch; null when unparseable."""
    s = col.str.strip_chars()
    parsed = pl.coalesce(
        s.str.strptime(pl.Datetime("us"), "%Y-%m-%d %H:%M:%S%.f", strict=False),
        s.str.strptime(pl.Datetime("us"), "%Y-%m-%d %H:%M", strict=False),
        s.str.strptime(pl.Datetime("us"), "%Y-%m-%d", strict=False),
    )
    return parsed.cast(pl.Int64)


def note_time(df: pl.DataFrame, discharge: bool) -> pl.Expr:
    """A note's acquisition time (µs): its charttime, except that a discharge summary is never placed
    before it was written. MIMIC-IV-Note gives discharge summaries a date-only charttime (midnight of
    the discharge day), which would precede the discharge and leak the stay's outcome into predictions
    made earlier that day; so a discharge summary's time is max(charttime, storetime), or the end of
    its charttime's day when storetime is missing and charttime is a bare date."""
    chart = datetime_us(pl.col("charttime"))
    if not discharge:
        return chart
    midnight = (chart % DAY_US) == 0
    end_of_day = pl.when(midnight).then(chart + DAY_US - 1).otherwise(chart)
    if "storetime" not in df.columns:
        return end_of_day
    store = datetime_us(pl.col("storetime"))
    return pl.when(store.is_not_null()).then(pl.max_horizontal(chart, store)).otherwise(end_of_day)


def study_time_us(study_date: str, study_time: str) -> int | None:
    """MIMIC-CXR StudyDate (YYYYMMDD) + StudyTime (HHMMSS with optional fraction; leading zeros may be
    missing, e.g. '81413.5' is 08:14:13.5) -> µs since the epoch, or None if malformed."""
    try:
        date = str(study_date).strip().split(".")[0]
        whole, _, frac = str(study_time).strip().partition(".")
        whole = whole.zfill(6)
        if len(date) != 8 or len(whole) != 6 or not (whole.isdigit() and (frac == "" or frac.isdigit())):
            return None
        dt = datetime(
            int(date[:4]), int(date[4:6]), int(date[6:]), int(whole[:2]), int(whole[2:4]), int(whole[4:])
        )
    except ValueError:
        return None
    return (dt - EPOCH) // timedelta(microseconds=1) + (int((frac + "000000")[:6]) if frac else 0)


def int_or_none(x: Any) -> int | None:
    try:
        return int(str(x).strip().split(".")[0])
    except (TypeError, ValueError):
        return None

"""Readers for the MIMIC modality formats: `mmehr index` and `load_payload`.

`mmehr index --source ecg|cxr|note --root DIR --out DIR [--views PA,AP]` turns a source root into a
table of modality events (docs/interfaces.md):

    OUT/events.parquet   subject_id int64, time int64 (acquisition, µs since the epoch), modality,
                         event_id (unique), payload (path relative to the root, or note id), and metadata:
                           ecg:  fs, n_samples, sig_names (the header's native lead order, comma-joined)
                           cxr:  view_position, study_id, rows, columns
                           note: note_type, hadm_id, text
    OUT/skipped.parquet  one row per record left out: subject_id, record, reason
    OUT/manifest.json    source, absolute root, counts (written last)

Source formats (MIMIC-IV-ECG, MIMIC-CXR-JPG, MIMIC-IV-Note):
  ecg:  ROOT/record_list.csv (subject_id, study_id, file_name, ecg_time, path) + WFDB records at
        ROOT/{path}.hea/.dat. Each record's header is read (wfdb.rdheader) and its .dat size checked;
        missing or corrupt records, and records lacking one of the 12 leads, are skipped.
  cxr:  ROOT/mimic-cxr-2.0.0-metadata.csv(.gz) (dicom_id, subject_id, study_id, ViewPosition, StudyDate
        YYYYMMDD, StudyTime HHMMSS[.ffff]) + ROOT/files/p{2 digits}/p{subject}/s{study}/{dicom_id}.jpg.
        Each JPEG's header is opened with PIL and its end-of-image marker checked.
  note: ROOT/discharge.csv(.gz) and/or ROOT/radiology.csv(.gz) (also under ROOT/note/), with note_id,
        subject_id, hadm_id, note_type, charttime, text; time = charttime; empty text is skipped.
        Note text is stored in the events table (never printed).

`load_payload(events_dir, row)` returns the payload an encoder needs:
  ecg  -> (np.ndarray float32 (12, n_samples) in mV, leads in canonical order I, II, III, aVR, aVL,
          aVF, V1..V6 whatever the file's order; missing samples as 0; fs in Hz as float)
  cxr  -> np.ndarray uint8 (H, W), grayscale
  note -> str
"""

from __future__ import annotations

import argparse
import functools
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from tqdm import tqdm

from mmehr.io import MANIFEST, atomic_path, check_output, read_manifest, write_json
from mmehr.modalities.tables import (
    NOT_UTF8,
    datetime_us,
    find_file,
    int_or_none,
    note_time,
    read_csv_checked,
    study_time_us,
)

CANONICAL_LEADS = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")
_LEAD_ALIASES = {name.lower(): name for name in CANONICAL_LEADS}

SOURCES = ("ecg", "cxr", "note")
ECG_LIST = "record_list.csv"
CXR_METADATA = "mimic-cxr-2.0.0-metadata.csv"
NOTE_FILES = ("discharge", "radiology")

SKIPPED_SCHEMA = {"subject_id": pl.Int64, "record": pl.String, "reason": pl.String}
# The columns every events.parquet starts with (docs/interfaces.md); each source adds its metadata.
EVENT_SCHEMA = {
    "subject_id": pl.Int64,
    "time": pl.Int64,
    "modality": pl.String,
    "event_id": pl.String,
    "payload": pl.String,
}


# ----------------------------------------------------------------------------------------------------
# ECG leads (the source tables are read by `mmehr.modalities.tables`)


def canonical_lead(name: str) -> str | None:
    """Header lead name -> canonical name ('AVF', 'avf' -> 'aVF'), or None if not a standard lead."""
    return _LEAD_ALIASES.get(name.strip().lower())


# ----------------------------------------------------------------------------------------------------
# Indexers: each returns (events, skipped) frames


def index_ecg(root: Path) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Index MIMIC-IV-ECG: record_list.csv + WFDB headers (see the module docstring)."""
    csv = root / ECG_LIST
    if not csv.is_file():
        raise FileNotFoundError(f"{csv} not found: an ECG root holds record_list.csv (MIMIC-IV-ECG layout)")
    df = read_csv_checked(csv, ["subject_id", "study_id", "ecg_time", "path"])
    df = df.with_columns(datetime_us(pl.col("ecg_time")).alias("time"))
    events, skipped = [], []
    for row in tqdm(df.iter_rows(named=True), total=df.height, desc="index ecg", unit="rec"):
        sid, rel = int_or_none(row["subject_id"]), (row["path"] or "").strip()
        reason, header = _check_ecg(root / rel) if rel else ("missing path", None)
        if reason is None and sid is None:
            reason = "bad subject_id"
        if reason is None and row["time"] is None:
            reason = "bad ecg_time"
        if row.get(NOT_UTF8):
            reason = "not UTF-8"
        if reason is not None:
            skipped.append((sid, rel, reason))
            continue
        events.append(
            {
                "subject_id": sid,
                "time": row["time"],
                "modality": "ecg",
                "event_id": f"ecg-{row['study_id']}",
                "payload": rel,
                "fs": float(header.fs),
                "n_samples": header.sig_len,
                "sig_names": ",".join(header.sig_name),
            }
        )
    schema = {
        **EVENT_SCHEMA,
        "fs": pl.Float64,
        "n_samples": pl.Int64,
        "sig_names": pl.String,
    }
    return pl.DataFrame(events, schema=schema), pl.DataFrame(skipped, schema=SKIPPED_SCHEMA, orient="row")


@dataclass
class WfdbHeader:
    """What indexing needs from a WFDB header: sampling rate (Hz), samples per signal, and per signal
    its file, storage format and name."""

    fs: float
    sig_len: int
    file_name: list[str]
    fmt: list[str]
    sig_name: list[str]


def read_wfdb_header(stem: Path) -> WfdbHeader:
    """Parse stem.hea. Plain single-segment headers (as MIMIC-IV-ECG's) are parsed directly, which is
    ~30x faster than wfdb.rdheader (it builds a pandas frame per record); anything else goes through
    wfdb.rdheader. Raises on a malformed header."""
    try:
        lines = [
            ln
            for ln in stem.with_suffix(".hea").read_text().splitlines()
            if ln.strip() and not ln.startswith("#")
        ]
        record = lines[0].split()
        n_sig = int(record[1])
        if "/" in record[0] or len(lines) != 1 + n_sig or len(record) < 4:
            raise ValueError("not a plain single-segment header")
        signals = [ln.split(maxsplit=8) for ln in lines[1:]]
        return WfdbHeader(
            fs=float(record[2].split("/")[0]),
            sig_len=int(record[3]),
            file_name=[f[0] for f in signals],
            fmt=[f[1].split("x")[0].split(":")[0].split("+")[0] for f in signals],
            sig_name=[f[8].strip() if len(f) > 8 else "" for f in signals],
        )
    except (ValueError, IndexError):
        import wfdb

        h = wfdb.rdheader(str(stem))
        return WfdbHeader(float(h.fs), int(h.sig_len or 0), list(h.file_name), list(h.fmt), list(h.sig_name))


def _check_ecg(stem: Path) -> tuple[str | None, WfdbHeader | None]:
    """(None, header) if the record looks readable, else (reason, None). Cheap: no samples are decoded."""
    if not stem.with_suffix(".hea").is_file():
        return "missing header", None
    try:
        header = read_wfdb_header(stem)
    except Exception:
        return "corrupt header", None
    if not set(CANONICAL_LEADS) <= {canonical_lead(n) for n in header.sig_name}:
        return "missing leads", None
    if header.sig_len <= 0 or header.fs <= 0:
        return "corrupt header", None
    files = set(header.file_name)
    for f in files:
        if not (stem.parent / f).is_file():
            return "missing data file", None
    expected = 2 * len(header.sig_name) * header.sig_len  # format 16: two bytes per sample
    if (
        len(files) == 1
        and set(header.fmt) == {"16"}
        and (stem.parent / files.pop()).stat().st_size < expected
    ):
        return "truncated data file", None
    return None, header


def cxr_image_path(subject_id: int, study_id: Any, dicom_id: str) -> str:
    """MIMIC-CXR-JPG path of an image, relative to the root."""
    sid = str(subject_id)
    return f"files/p{sid[:2]}/p{sid}/s{study_id}/{dicom_id}.jpg"


def index_cxr(root: Path, views: list[str] | None = None) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Index MIMIC-CXR-JPG: metadata CSV + JPEG checks; `views` keeps only those ViewPositions."""
    from PIL import Image

    csv = find_file(root, [CXR_METADATA, CXR_METADATA + ".gz"])
    if csv is None:
        raise FileNotFoundError(
            f"{root / CXR_METADATA} not found: a CXR root holds it (MIMIC-CXR-JPG layout)"
        )
    df = read_csv_checked(
        csv, ["dicom_id", "subject_id", "study_id", "ViewPosition", "StudyDate", "StudyTime"]
    )
    wanted = {v.strip().upper() for v in views} if views else None
    events, skipped = [], []
    for row in tqdm(df.iter_rows(named=True), total=df.height, desc="index cxr", unit="img"):
        sid = int_or_none(row["subject_id"])
        view = (row["ViewPosition"] or "").strip()
        rel = cxr_image_path(sid, row["study_id"], row["dicom_id"]) if sid is not None else row["dicom_id"]
        t = study_time_us(row["StudyDate"], row["StudyTime"])
        if row.get(NOT_UTF8):
            reason = "not UTF-8"
        elif sid is None:
            reason = "bad subject_id"
        elif wanted is not None and view.upper() not in wanted:
            reason = f"view {view or 'missing'} not selected"
        elif t is None:
            reason = "bad StudyDate/StudyTime"
        else:
            reason, size = _check_jpeg(Image, root / rel)
        if reason is not None:
            skipped.append((sid, rel, reason))
            continue
        events.append(
            {
                "subject_id": sid,
                "time": t,
                "modality": "cxr",
                "event_id": f"cxr-{row['dicom_id']}",
                "payload": rel,
                "view_position": view or None,
                "study_id": int_or_none(row["study_id"]),
                "rows": size[1],
                "columns": size[0],
            }
        )
    schema = {
        **EVENT_SCHEMA,
        "view_position": pl.String,
        "study_id": pl.Int64,
        "rows": pl.Int64,
        "columns": pl.Int64,
    }
    return pl.DataFrame(events, schema=schema), pl.DataFrame(skipped, schema=SKIPPED_SCHEMA, orient="row")


def _check_jpeg(Image, path: Path) -> tuple[str | None, tuple[int, int] | None]:
    """(None, (width, height)) if the JPEG opens and ends with an EOI marker, else (reason, None)."""
    if not path.is_file():
        return "missing image", None
    try:
        with Image.open(path) as im:
            size = im.size
        with open(path, "rb") as f:
            f.seek(max(path.stat().st_size - 64, 0))
            tail = f.read()
    except Exception:
        return "unreadable image", None
    if b"\xff\xd9" not in tail:
        return "truncated image", None
    return None, size


def index_note(root: Path) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Index MIMIC-IV-Note discharge and radiology CSVs (either may be absent, not both)."""
    found = []
    for name in NOTE_FILES:
        for base in (root, root / "note"):
            path = find_file(base, [f"{name}.csv.gz", f"{name}.csv"])
            if path is not None:
                found.append(path)
                break
    if not found:
        raise FileNotFoundError(
            f"{root}: no discharge.csv(.gz) or radiology.csv(.gz) found (MIMIC-IV-Note layout, also looked in "
            f"{root / 'note'})"
        )
    frames, skipped = [], []
    for path in found:
        df = read_csv_checked(path, ["note_id", "subject_id", "hadm_id", "note_type", "charttime", "text"])
        not_utf8 = df[NOT_UTF8] if NOT_UTF8 in df.columns else pl.repeat(False, df.height, eager=True)
        df = df.select(
            not_utf8.alias(NOT_UTF8),
            pl.col("subject_id").str.strip_chars().cast(pl.Int64, strict=False),
            note_time(df, discharge=path.name.startswith("discharge")).alias("time"),
            pl.col("note_id"),
            pl.col("note_type"),
            pl.col("hadm_id").str.strip_chars().cast(pl.Float64, strict=False).cast(pl.Int64),
            pl.col("text"),
        )
        reason = (
            pl.when(pl.col(NOT_UTF8))
            .then(pl.lit("not UTF-8"))
            .when(pl.col("subject_id").is_null())
            .then(pl.lit("bad subject_id"))
            .when(pl.col("time").is_null())
            .then(pl.lit("bad charttime"))
            .when(pl.col("text").is_null() | (pl.col("text").str.strip_chars() == ""))
            .then(pl.lit("empty text"))
        )
        df = df.with_columns(reason.alias("reason"))
        skipped.append(
            df.filter(pl.col("reason").is_not_null()).select("subject_id", record="note_id", reason="reason")
        )
        frames.append(df.filter(pl.col("reason").is_null()).drop("reason", NOT_UTF8))
    events = pl.concat(frames).select(
        "subject_id",
        "time",
        pl.lit("note").alias("modality"),
        ("note-" + pl.col("note_id")).alias("event_id"),
        pl.col("note_id").alias("payload"),
        "note_type",
        "hadm_id",
        "text",
    )
    return events, pl.concat(skipped).cast(SKIPPED_SCHEMA)


# ----------------------------------------------------------------------------------------------------
# The index stage


def build_index(source: str, root: str | Path, out: str | Path, views: list[str] | None = None) -> Path:
    """Index one source root into OUT (events.parquet, skipped.parquet, manifest.json last), atomically."""
    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r}; choose one of {SOURCES}")
    root, out = Path(root).resolve(), Path(out)
    if not root.is_dir():
        raise FileNotFoundError(f"source root {root} is not a directory")
    if views and source != "cxr":
        raise ValueError("--views applies to --source cxr only")
    check_output(out, "index", inputs=[root])  # before reading every record, not after
    t0 = time.perf_counter()
    if source == "ecg":
        events, skipped = index_ecg(root)
    elif source == "cxr":
        events, skipped = index_cxr(root, views)
    else:
        events, skipped = index_note(root)
    events = events.sort(["subject_id", "time", "event_id"])
    duplicated = events["event_id"].is_duplicated()
    if duplicated.any():
        dups = events.filter(duplicated)["event_id"].unique().head(5).to_list()
        raise ValueError(f"{root}: duplicate records in the source index, e.g. {dups}")
    seconds = time.perf_counter() - t0
    with atomic_path(out, stage="index", inputs=[root]) as tmp:
        tmp.mkdir(parents=True)
        events.write_parquet(tmp / "events.parquet")
        skipped.write_parquet(tmp / "skipped.parquet")
        write_json(
            tmp / MANIFEST,
            {
                "stage": "index",
                "source": source,
                "modality": source,
                "root": str(root),
                "views": views,
                "counts": {
                    "records": events.height + skipped.height,
                    "events": events.height,
                    "skipped": skipped.height,
                    "subjects": events["subject_id"].n_unique(),
                    "skipped_by_reason": dict(Counter(skipped["reason"].to_list())),
                },
                "time_range_us": [events["time"].min(), events["time"].max()],
                "seconds": round(seconds, 3),
                "events_per_s": round(events.height / max(seconds, 1e-9), 1),
                "created_at": datetime.now().isoformat(),
            },
        )
    reasons = ", ".join(f"{k}: {v}" for k, v in Counter(skipped["reason"].to_list()).most_common())
    print(
        f"mmehr index: {events.height} {source} events from {root} in {seconds:.1f} s "
        f"({events.height / max(seconds, 1e-9):.0f} events/s); skipped {skipped.height}"
        f"{f' ({reasons})' if reasons else ''}; wrote {out}"
    )
    return out


# ----------------------------------------------------------------------------------------------------
# Payloads


def source_root(events_dir: str | Path) -> Path | None:
    """The source root an events directory was indexed from (its manifest's `root`), when it says."""
    try:
        root = read_manifest(events_dir).get("root")
    except (OSError, ValueError):
        return None
    return Path(root) if isinstance(root, str) and root else None


def _source_of(events_dir: Path) -> Path:
    """The absolute source root of an events directory (cached per manifest version)."""
    manifest = events_dir / MANIFEST
    if not manifest.is_file():
        read_manifest(events_dir)  # raises the explanatory error
    return _cached_root(str(events_dir), manifest.stat().st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _cached_root(events_dir: str, _mtime: int) -> Path:
    return Path(read_manifest(events_dir)["root"])


@functools.lru_cache(maxsize=4)
def _note_texts(events_dir: str, _mtime: int) -> dict[str, str]:
    df = pl.read_parquet(Path(events_dir) / "events.parquet", columns=["payload", "text"])
    return dict(zip(df["payload"].to_list(), df["text"].to_list()))


def load_payload(events_dir: str | Path, row: Mapping[str, Any]) -> Any:
    """The payload of one event row (a mapping with at least `modality` and `payload`).

    ecg -> (float32 array (12, n_samples) in mV, canonical lead order; fs in Hz);
    cxr -> uint8 array (H, W); note -> str. See the module docstring.
    """
    events_dir = Path(events_dir).resolve()
    root = _source_of(events_dir)
    modality, payload = row["modality"], row["payload"]
    if modality == "ecg":
        import wfdb

        try:
            signal, fields = wfdb.rdsamp(str(root / payload))
        except Exception as e:
            raise ValueError(
                f"{root / payload}: cannot read the WFDB record ({type(e).__name__}: {e})"
            ) from e
        names = [canonical_lead(n) for n in fields["sig_name"]]
        order = [names.index(lead) for lead in CANONICAL_LEADS]
        ecg = np.nan_to_num(signal[:, order].T.astype(np.float32), nan=0.0)
        return ecg, float(fields["fs"])
    if modality == "cxr":
        from PIL import Image

        with Image.open(root / payload) as im:
            return np.asarray(im.convert("L"), dtype=np.uint8)
    if modality == "note":
        text = row.get("text")
        if text is None:
            mtime = (events_dir / MANIFEST).stat().st_mtime_ns
            text = _note_texts(str(events_dir), mtime).get(payload)
        if text is None:
            raise KeyError(f"note {payload} is not in {events_dir / 'events.parquet'}")
        return text
    raise ValueError(f"unknown modality {modality!r} (expected one of {SOURCES})")


# ----------------------------------------------------------------------------------------------------
# CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", required=True, choices=SOURCES, help="which modality source format")
    parser.add_argument(
        "--root", required=True, help="the source root (MIMIC-IV-ECG / MIMIC-CXR-JPG / MIMIC-IV-Note)"
    )
    parser.add_argument("--out", required=True, help="output directory for events.parquet")
    parser.add_argument(
        "--views", default=None, help="CXR only: comma-separated ViewPositions to keep, e.g. PA,AP"
    )


def run(args: argparse.Namespace) -> int:
    views = [v for v in args.views.split(",") if v.strip()] if args.views else None
    build_index(args.source, args.root, args.out, views)
    return 0

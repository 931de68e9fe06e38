"""Drivers: `generate` writes a whole synthetic cohort (MEDS shards + metadata + splits, truth tables,
modality roots, manifest)."""

from __future__ import annotations

import time
from dataclasses import asdict
from datetime import datetime
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from mmehr.data.synthetic.codes import code_descriptions
from mmehr.data.synthetic.config import SUBJECT_ID0, SynthConfig
from mmehr.data.synthetic.ehr import MedsRows, simulate_subject
from mmehr.data.synthetic.stays import TRUTH_SCHEMA, truth_rows
from mmehr.data.synthetic.writers import ModalityWriter
from mmehr.io import MANIFEST, atomic_path, write_json


def generate(out: str | Path, cfg: SynthConfig) -> Path:
    """Write a synthetic cohort to `out` (atomically; manifest last). Returns `out`."""
    out = Path(out)
    t0 = time.perf_counter()
    with atomic_path(out, stage="synth") as tmp:
        meds = tmp / "meds"
        writer = ModalityWriter(tmp, cfg) if cfg.modalities else None
        truth: list[pl.DataFrame] = []  # one frame per chunk: compact, so memory stays bounded
        splits: list[tuple[int, str]] = []
        codes: dict[str, str] = {}
        descriptions = code_descriptions()
        n_rows = n_stays = 0
        bar = tqdm(total=cfg.subjects, desc="synth", unit="subj")
        for chunk, start in enumerate(range(0, cfg.subjects, cfg.chunk_subjects)):
            rows, chunk_truth = MedsRows(), []
            for i in range(start, min(start + cfg.chunk_subjects, cfg.subjects)):
                stays = simulate_subject(i, cfg, rows)
                split = split_of(cfg.seed, i)
                splits.append((SUBJECT_ID0 + i, split))
                chunk_truth += truth_rows(stays, split)
                n_stays += len(stays)
                if writer is not None:
                    writer.write_subject(i, stays)
                bar.update(1)
            if writer is not None:
                writer.flush()
            truth.append(pl.DataFrame(chunk_truth, schema=TRUTH_SCHEMA))
            frame = rows.to_frame()
            n_rows += frame.height
            for c in frame["code"].unique().sort().to_list():
                codes.setdefault(c, descriptions.get(c, c.replace("//", " ")))
            _write_split_shards(meds, frame, chunk, dict(splits[start:]))
        bar.close()
        _write_meds_metadata(meds, splits, codes, cfg)
        pl.concat(truth).write_parquet(tmp / "truth.parquet")
        counts = {"subjects": cfg.subjects, "stays": n_stays, "meds_rows": n_rows, "codes": len(codes)}
        if writer is not None:
            counts.update(writer.counts)
            writer.write_ledger(tmp / "truth_events.parquet")
        seconds = time.perf_counter() - t0
        write_json(
            tmp / MANIFEST,
            {
                "stage": "synth",
                "mode": "generate",
                "config": asdict(cfg),
                "meds_root": str(out.resolve() / "meds"),
                "modalities": ["ecg", "cxr", "note"] if cfg.modalities else [],
                "counts": counts,
                "seconds": round(seconds, 3),
                "subjects_per_s": round(cfg.subjects / max(seconds, 1e-9), 2),
                "created_at": datetime.now().isoformat(),
            },
        )
    print(
        f"mmehr synth: {cfg.subjects} subjects, {n_stays} stays, {n_rows} MEDS rows in {seconds:.1f} s "
        f"({cfg.subjects / max(seconds, 1e-9):.0f} subjects/s); wrote {out}"
    )
    return out


def _write_split_shards(meds: Path, frame: pl.DataFrame, chunk: int, split_by_sid: dict[int, str]) -> None:
    """Write one chunk's rows as data/{split}/{chunk}.parquet, each shard validated against MEDS."""
    split = frame["subject_id"].replace_strict(split_by_sid, return_dtype=pl.String)
    for name in ("train", "tuning", "held_out"):
        part = frame.filter(split == name)
        if part.is_empty():
            continue
        shard = to_meds_arrow(part)
        where = meds / "data" / name / f"{chunk}.parquet"
        validate_meds_table(shard, str(where))
        where.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(shard, where)


def to_meds_arrow(df: pl.DataFrame) -> pa.Table:
    """A polars MEDS frame as the arrow table the `meds` schema wants (string columns, large text_value)."""
    table = df.to_arrow()
    fields = [
        pa.field(f.name, pa.large_string() if f.name == "text_value" else pa.string())
        if pa.types.is_large_string(f.type) or pa.types.is_string_view(f.type)
        else f
        for f in table.schema
    ]
    return table.cast(pa.schema(fields))


def split_of(seed: int, i: int) -> str:
    """80/10/10 train/tuning/held_out, exact within every block of 10 subjects."""
    perm = np.random.default_rng([seed, 7, i // 10]).permutation(10)
    slot = int(perm[i % 10])
    return "train" if slot < 8 else ("tuning" if slot == 8 else "held_out")


def validate_meds_table(table: pa.Table, where: str) -> None:
    """Raise ValueError naming `where` if `table` breaks the MEDS data schema or ordering."""
    from meds import DataSchema

    try:
        DataSchema.validate(table)
    except Exception as e:
        raise ValueError(f"{where}: not a valid MEDS data table: {e}") from e
    df = pl.from_arrow(table.select(["subject_id", "time"]))
    ok = df.select(
        (pl.col("subject_id").diff().fill_null(0) >= 0).all().alias("sorted_subjects"),
    ).item()
    if not ok:
        raise ValueError(f"{where}: subjects are not contiguous and sorted")


def _write_meds_metadata(
    meds: Path, splits: list[tuple[int, str]], codes: dict[str, str], cfg: SynthConfig
) -> None:
    from meds import CodeMetadataSchema, DatasetMetadataSchema, SubjectSplitSchema

    from mmehr import __version__

    meta = meds / "metadata"
    meta.mkdir(parents=True, exist_ok=True)
    split_tbl = pa.table(
        {
            "subject_id": pa.array([s for s, _ in splits], pa.int64()),
            "split": pa.array([p for _, p in splits], pa.string()),
        }
    )
    SubjectSplitSchema.validate(split_tbl)
    pq.write_table(split_tbl, meta / "subject_splits.parquet")
    names = sorted(codes)
    parents = [
        [f"ICD10CM/{c.rsplit('//', 1)[1]}"] if c.startswith("DIAGNOSIS//ICD//10//") else None for c in names
    ]
    codes_tbl = pa.table(
        {
            "code": pa.array(names, pa.string()),
            "description": pa.array([codes[c] for c in names], pa.string()),
            "parent_codes": pa.array(parents, pa.list_(pa.string())),
        }
    )
    CodeMetadataSchema.validate(codes_tbl)
    pq.write_table(codes_tbl, meta / "codes.parquet")
    dataset = {
        "dataset_name": "mmehr-synthetic",
        "dataset_version": f"seed{cfg.seed}-n{cfg.subjects}",
        "etl_name": "mmehr.data.synthetic",
        "etl_version": __version__,
        "meds_version": "0.4.1",
        "created_at": datetime.now().isoformat(),
        "raw_source_id_columns": ["hadm_id", "icustay_id"],
        "other_extension_columns": ["insurance", "language", "marital_status", "race"],
    }
    DatasetMetadataSchema.validate(dataset)
    write_json(meta / "dataset.json", dataset)

"""The `mmehr tokenize` stage: fit (or reuse) a tokenizer and write memory-mapped timelines in the
layout `mmehr.data.timelines` describes and reads.

Input shards are read, tokenised and written one at a time, so memory is bounded by the largest shard.
The whole output is built under a temporary name and renamed into place when complete.
"""

from __future__ import annotations

import argparse
import datetime
import re
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
from tqdm import tqdm

from mmehr.data.meds import SPLITS, MedsDataset, Shard, open_meds, read_shard, write_splits
from mmehr.data.timelines import ARRAYS
from mmehr.data.tokenizer import (
    UNK,
    UNK_SUFFIX,
    TokenizedShard,
    Tokenizer,
    load_preset,
    needed_columns,
    static_columns,
)
from mmehr.io import atomic_path, check_output, read_manifest, write_json


def write_shard(directory: Path, shard: TokenizedShard) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name in ARRAYS:
        np.save(directory / f"{name}.npy", np.ascontiguousarray(getattr(shard, name)))


def _tokenize_shard(
    tokenizer: Tokenizer, dataset: MedsDataset, shard: Shard, out: Path, summary: dict
) -> int:
    """Tokenise one input shard and write one directory per split it holds; returns the number of its
    subjects without timed events (left out). A function, so the shard's arrays are freed on return.

    Counts per split, beside subjects and tokens: `unknown_tokens` and `unknown_static` (timeline and
    static tokens that read as unknown: codes the vocabulary lacks) and `infinite_values` (rows whose
    numeric_value is +-inf: the decile fit leaves them out and they tokenize as the top / bottom decile)."""
    preset = tokenizer.preset
    rows = read_shard(shard, needed_columns(preset), categorical=static_columns(preset))
    infinite = rows.subject[np.isinf(rows.numeric_value)]
    ts = tokenizer.transform(rows)
    del rows
    split = _splits_of(dataset.splits, ts.subject_ids)
    unknown = _unknown_ids(tokenizer)
    for name, s in summary.items():
        part = ts.select(split == name)
        if len(part.subject_ids):
            write_shard(out / name / f"shard-{shard.index}", part)
            s["subjects"] += len(part.subject_ids)
            s["tokens"] += len(part.tokens)
            s["shards"].append(f"shard-{shard.index}")
            s["unknown_tokens"] += int(np.isin(part.tokens, unknown).sum())
            s["unknown_static"] += int(np.isin(part.static_tokens, unknown).sum())
            s["infinite_values"] += int(np.isin(infinite, part.subject_ids).sum())
    return len(dataset.shard_subjects[shard.index]) - len(ts.subject_ids)


def _unknown_ids(tokenizer: Tokenizer) -> np.ndarray:
    """Ids of the tokens that stand for something the vocabulary lacks: <UNK> and every `...//<UNK>`."""
    return np.array(
        [i for i, t in enumerate(tokenizer.vocab.itos) if t == UNK or t.endswith(UNK_SUFFIX)], dtype=np.int64
    )


def _splits_of(splits: pl.DataFrame, subject_ids: np.ndarray) -> np.ndarray:
    """The split name of each subject id (str array, same order)."""
    order = pl.DataFrame({"subject_id": subject_ids}).join(
        splits, on="subject_id", how="left", maintain_order="left"
    )
    return order["split"].to_numpy()


DEFAULT_MIN_CODE_COUNT = 10


def detect_preset(dataset: MedsDataset) -> str:
    """Pick a preset: MIMIC-IV (dataset.json's dataset_name) -> ethos, the paper's protocol (ETHOS-ARES's
    vocabulary); otherwise from the codes: `LAB//RESULT//...` -> mimic_iv; older MIMIC-style codes ->
    mimic_iv_legacy (e.g. mmehr's synthetic cohort); anything else -> generic."""
    name = str(dataset.metadata.get("dataset_name") or "")
    if re.match(r"(?i)^mimic[-_ ]?iv", name):
        return "ethos"
    first = pq.read_table(dataset.shards[0].path, columns=["code"], read_dictionary=["code"]).column("code")
    codes = pl.Series(first.unify_dictionaries().chunk(0).dictionary.to_pylist() if first.num_chunks else [])
    meta = dataset.root / "metadata" / "codes.parquet"
    codes = pl.concat(
        [codes.cast(pl.String), pl.read_parquet(meta, columns=["code"])["code"].cast(pl.String)]
    )
    if codes.str.starts_with("LAB//RESULT//").any():
        return "mimic_iv"
    if codes.str.contains(r"^(LAB//\d+//|HOSPITAL_ADMISSION//)").any():
        return "mimic_iv_legacy"
    return "generic"


def tokenize(
    meds_root: str | Path,
    out: str | Path,
    vocab_from: str | Path | None = None,
    preset: str | Path | None = None,
    min_code_count: int | None = None,
    max_values_per_code: int = 10_000,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Tokenise a MEDS root into `out` (see module doc); returns the manifest.

    Fits the tokenizer on the train split, or reuses the one in `vocab_from` (a complete tokenize
    output) without refitting. `min_code_count` defaults to the preset's (the `ethos` preset: 1, every
    train code, as ETHOS), else 10. `out` appears only when everything is written.
    """
    t0 = time.perf_counter()
    check_output(out, "tokenize", inputs=[meds_root, vocab_from])  # before the fit, not after
    dataset = open_meds(meds_root, seed=seed)
    if vocab_from is not None:
        if preset is not None:
            raise ValueError(
                "--preset cannot be combined with --vocab-from (the reused tokenizer has its own)"
            )
        read_manifest(vocab_from)
        tokenizer = Tokenizer.load(vocab_from)
    else:
        chosen = load_preset(preset or detect_preset(dataset))
        if min_code_count is None:
            min_code_count = chosen.min_code_count or DEFAULT_MIN_CODE_COUNT
        tokenizer = Tokenizer.fit(dataset, chosen, min_code_count, max_values_per_code, progress=progress)
    vocab = tokenizer.vocab

    split_names = [s for s in SPLITS if s in set(dataset.splits["split"])]
    split_names += sorted(set(dataset.splits["split"]) - set(SPLITS))
    summary = {
        s: {
            "subjects": 0,
            "tokens": 0,
            "shards": [],
            "unknown_tokens": 0,
            "unknown_static": 0,
            "infinite_values": 0,
        }
        for s in split_names
    }
    without_events = 0
    with atomic_path(out, stage="tokenize", inputs=[meds_root, vocab_from]) as tmp:
        tmp.mkdir(parents=True)
        tokenizer.save(tmp)
        write_splits(dataset.splits, tmp / "subject_splits.parquet")
        for shard in tqdm(dataset.shards, desc="tokenize", unit="shard", disable=not progress):
            without_events += _tokenize_shard(tokenizer, dataset, shard, tmp, summary)
        seconds = time.perf_counter() - t0
        manifest = {
            "stage": "tokenize",
            "created_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "meds_root": str(Path(meds_root).resolve()),
            "dataset": {k: dataset.metadata.get(k) for k in ("dataset_name", "dataset_version", "etl_name")},
            "preset": tokenizer.preset.name,
            "vocab_from": str(Path(vocab_from).resolve()) if vocab_from is not None else None,
            "min_code_count": tokenizer.stats["min_code_count"],
            "splits_source": dataset.splits_source,
            "vocab_size": len(vocab),
            "token_dtype": vocab.dtype.name,
            "static_fields": vocab.static_fields,
            "splits": summary,
            "inputs": [
                {"shard": f"shard-{s.index}", "file": s.name, "rows": s.n_rows} for s in dataset.shards
            ],
            "skipped": {"empty_shards": dataset.empty_shards, "subjects_without_events": without_events},
            "rows": dataset.n_rows,
            "seconds": round(seconds, 3),
            "rows_per_s": round(dataset.n_rows / seconds),
        }
        write_json(tmp / "manifest.json", manifest)
    return manifest


# ----------------------------------------------------------------------------------------------------
# command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--meds", required=True, type=Path, help="MEDS dataset root (data/, metadata/)")
    parser.add_argument("--out", required=True, type=Path, help="output directory (replaced when complete)")
    parser.add_argument(
        "--vocab-from",
        type=Path,
        default=None,
        help="reuse the fitted tokenizer of an earlier tokenize output",
    )
    parser.add_argument(
        "--preset",
        default=None,
        help="normalisation preset name or YAML file (default: ethos for a dataset named MIMIC-IV, the "
        "paper's protocol; otherwise detected from the codes)",
    )
    parser.add_argument(
        "--min-code-count",
        type=int,
        default=None,
        help=f"train count below which a code becomes <UNK> (default: the preset's, else {DEFAULT_MIN_CODE_COUNT})",
    )
    parser.add_argument(
        "--max-values-per-code", type=int, default=10_000, help="train values sampled per code for deciles"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the 80/10/10 split when the dataset has none"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def run(args: argparse.Namespace) -> int:
    manifest = tokenize(
        args.meds,
        args.out,
        vocab_from=args.vocab_from,
        preset=args.preset,
        min_code_count=args.min_code_count,
        max_values_per_code=args.max_values_per_code,
        seed=args.seed,
        progress=not args.no_progress,
    )
    print(
        f"tokenized {manifest['rows']:,} MEDS rows in {manifest['seconds']:.2f} s "
        f"({manifest['rows_per_s']:,} events/s); preset {manifest['preset']}, vocab {manifest['vocab_size']:,} "
        f"({manifest['token_dtype']}), splits {manifest['splits_source']}"
    )
    for split, s in manifest["splits"].items():
        print(
            f"  {split:<9} {s['subjects']:>8,} subjects {s['tokens']:>13,} tokens in {len(s['shards'])} shard(s), "
            f"{s['unknown_tokens']:,} unknown ({s['unknown_tokens'] / max(s['tokens'], 1):.1%})"
        )
    if manifest["vocab_from"]:
        unknown = sum(s["unknown_tokens"] for s in manifest["splits"].values())
        tokens = sum(s["tokens"] for s in manifest["splits"].values())
        print(
            f"  --vocab-from {manifest['vocab_from']}: {unknown:,} of {tokens:,} tokens ({unknown / max(tokens, 1):.1%}) "
            "are codes its vocabulary lacks (read as unknown)",
            file=sys.stderr,
        )
    infinite = sum(s["infinite_values"] for s in manifest["splits"].values())
    if infinite:
        print(
            f"  warning: {infinite:,} row(s) with numeric_value +-inf: left out of the decile fit, tokenized as "
            "the top / bottom decile (manifest: splits.*.infinite_values)",
            file=sys.stderr,
        )
    skipped = manifest["skipped"]
    if skipped["empty_shards"] or skipped["subjects_without_events"]:
        print(
            f"  skipped: {len(skipped['empty_shards'])} empty shard(s), "
            f"{skipped['subjects_without_events']} subject(s) without timed events",
            file=sys.stderr,
        )
    print(f"wrote {Path(args.out).resolve()}")
    return 0

"""Read and validate a MEDS dataset root, one shard at a time, with its subject splits.

A MEDS root holds `data/**/*.parquet` (rows: subject_id int64, time timestamp[us] (null = static),
code string, numeric_value float32, text_value large_string, extra columns allowed) and
`metadata/{dataset.json, codes.parquet, subject_splits.parquet}`. Schemas are checked with the `meds`
package at this boundary; row-level rules (non-null codes, one shard per subject, contiguous subjects,
times in order) are checked here. Every problem raises `MedsError` naming the file.

`open_meds(root)` reads only schemas, metadata and the `subject_id` column of every shard (an index
pass in bounded memory); `read_shard(shard)` then loads one shard's rows when a stage needs them.
Empty shards (no rows) are skipped and counted in `MedsDataset.empty_shards`, not treated as errors.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import meds
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from flexible_schema.exceptions import SchemaValidationError, TableValidationError

SPLITS = (meds.train_split, meds.tuning_split, meds.held_out_split)  # train, tuning, held_out
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)
# Same logical type (UTF-8 text), different offset width; polars writes large_string. Not a real mismatch.
_STRING_TYPES = {pa.string(), pa.large_string()}


class MedsError(ValueError):
    """A MEDS input that breaks the format; the message names the file and the problem."""


@dataclass(frozen=True)
class Shard:
    """One data file: `name` is its path under data/ without the suffix (e.g. "train/0")."""

    index: int
    path: Path
    name: str
    n_rows: int
    columns: tuple[str, ...]


@dataclass
class MedsDataset:
    """A validated MEDS root: its non-empty shards, metadata, and one split per subject."""

    root: Path
    shards: list[Shard]
    metadata: dict
    splits: pl.DataFrame  # subject_id int64, split str; exactly the subjects present in the data
    splits_source: str  # "dataset" (metadata/subject_splits.parquet) or "generated(seed=S)"
    empty_shards: list[str] = field(default_factory=list)
    shard_subjects: dict[int, np.ndarray] = field(default_factory=dict)  # shard index -> sorted ids

    @property
    def n_rows(self) -> int:
        return sum(s.n_rows for s in self.shards)

    def subjects(self, split: str) -> np.ndarray:
        """Sorted subject ids of one split (int64)."""
        ids = self.splits.filter(pl.col("split") == split)["subject_id"].to_numpy()
        return np.sort(ids)

    def shards_with(self, split: str) -> list[Shard]:
        """Shards holding at least one subject of `split`, in shard order."""
        ids = self.subjects(split)
        return [s for s in self.shards if np.isin(self.shard_subjects[s.index], ids).any()]


def open_meds(root: str | Path, seed: int = 0) -> MedsDataset:
    """Validate a MEDS root's layout, metadata and shard schemas; resolve splits.

    Uses the dataset's own `metadata/subject_splits.parquet` when present; otherwise makes a
    deterministic seeded 80/10/10 subject split (see `make_splits`), which the caller saves.
    """
    root = Path(root)
    data_dir = root / meds.data_subdirectory
    if not data_dir.is_dir():
        raise MedsError(f"{data_dir}: no data/ directory; is {root} a MEDS dataset root?")
    metadata = read_dataset_metadata(root)
    _check_codes_file(root)
    paths = sorted(data_dir.rglob("*.parquet"))
    if not paths:
        raise MedsError(f"{data_dir}: no *.parquet shards found")

    shards: list[Shard] = []
    empty: list[str] = []
    shard_subjects: dict[int, np.ndarray] = {}
    for path in paths:
        n_rows, columns = _check_shard_schema(path)
        name = path.relative_to(data_dir).with_suffix("").as_posix()
        if n_rows == 0:
            empty.append(name)  # documented counted skip: an empty shard holds no subject
            continue
        shard = Shard(len(shards), path, name, n_rows, columns)
        shard_subjects[shard.index] = _shard_subject_ids(shard)
        shards.append(shard)
    if not shards:
        raise MedsError(f"{data_dir}: every shard is empty")
    _check_one_shard_per_subject(shards, shard_subjects)

    all_ids = np.sort(np.concatenate(list(shard_subjects.values())))
    split_path = root / meds.subject_splits_filepath
    if split_path.is_file():
        splits, source = read_splits(split_path, all_ids), "dataset"
    else:
        splits, source = make_splits(all_ids, seed), f"generated(seed={seed})"
    return MedsDataset(root, shards, metadata, splits, source, empty, shard_subjects)


def read_dataset_metadata(root: Path) -> dict:
    """`metadata/dataset.json`, validated with `meds.DatasetMetadataSchema`."""
    path = root / meds.dataset_metadata_filepath
    if not path.is_file():
        raise MedsError(f"{path}: missing metadata file (every MEDS root has metadata/dataset.json)")
    try:
        metadata = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise MedsError(f"{path}: not valid JSON: {e}") from e
    if not isinstance(metadata, dict):
        raise MedsError(f"{path}: expected a JSON object, got {type(metadata).__name__}")
    try:
        meds.DatasetMetadataSchema.validate(metadata)
    except (SchemaValidationError, TableValidationError) as e:
        cause = e.__cause__ or e
        raise MedsError(f"{path}: does not match the MEDS dataset metadata schema: {cause}") from e
    return metadata


def _check_codes_file(root: Path) -> None:
    path = root / meds.code_metadata_filepath
    if not path.is_file():
        raise MedsError(f"{path}: missing metadata file (every MEDS root has metadata/codes.parquet)")
    _validate_schema(path, _read_schema(path), meds.CodeMetadataSchema, align=True)


def _read_schema(path: Path) -> pa.Schema:
    try:
        return pq.read_schema(path)
    except (pa.ArrowException, OSError) as e:
        raise MedsError(f"{path}: not a readable parquet file ({e})") from e


def _castable(got: pa.DataType, want: pa.DataType) -> bool:
    """Whether pyarrow casts `got` to `want` (what the `meds` schemas' `align` does to a column)."""
    try:
        pa.array([], type=got).cast(want)
        return True
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return False


def _validate_schema(path: Path, schema: pa.Schema, meds_schema: type, align: bool = False) -> None:
    """Check `schema` against a `meds` schema class; string vs large_string is accepted.

    With `align` (metadata tables, read by column name), accept what the schema's own `align` makes
    conform: polars writes `large_string` and `large_list<large_string>`, which cast to MEDS's `string`
    and `list<string>`. Only columns that cannot be cast are reported.
    """
    try:
        meds_schema.validate(schema)
        return
    except SchemaValidationError as e:
        missing, extra = e.missing_req_cols or [], e.disallowed_extra_cols or []
        mistyped = [(c, w, g) for c, w, g in e.mistyped_cols or [] if not {w, g} <= _STRING_TYPES]
        if align:
            mistyped = [(c, w, g) for c, w, g in mistyped if not _castable(g, w)]
    problems = []
    if missing:
        problems.append(f"missing required column(s) {missing}")
    if extra:
        problems.append(f"unexpected column(s) {extra}")
    if mistyped:
        problems.append("wrong dtype(s): " + ", ".join(f"{c} is {g}, expected {w}" for c, w, g in mistyped))
    if problems:
        raise MedsError(f"{path}: " + "; ".join(problems))


def _check_shard_schema(path: Path) -> tuple[int, tuple[str, ...]]:
    try:
        meta = pq.ParquetFile(path).metadata
    except (pa.ArrowException, OSError) as e:
        raise MedsError(f"{path}: not a readable parquet file ({e})") from e
    schema = _read_schema(path)
    _validate_schema(path, schema, meds.DataSchema)
    return meta.num_rows, tuple(schema.names)


def _shard_subject_ids(shard: Shard) -> np.ndarray:
    try:
        ids = pl.read_parquet(shard.path, columns=["subject_id"])["subject_id"]
    except Exception as e:  # polars raises several types for corrupt files
        raise MedsError(f"{shard.path}: not a readable parquet file ({e})") from e
    if ids.null_count():
        raise MedsError(f"{shard.path}: {ids.null_count()} row(s) with a null subject_id")
    return np.sort(ids.unique().to_numpy())


def _check_one_shard_per_subject(shards: list[Shard], shard_subjects: dict[int, np.ndarray]) -> None:
    ids = np.concatenate([shard_subjects[s.index] for s in shards])
    which = np.concatenate([np.full(len(shard_subjects[s.index]), s.index) for s in shards])
    order = np.argsort(ids, kind="stable")
    ids, which = ids[order], which[order]
    dup = np.nonzero(ids[1:] == ids[:-1])[0]
    if len(dup):
        i = dup[0]
        a, b = shards[which[i]].path, shards[which[i + 1]].path
        raise MedsError(
            f"{b}: subject {ids[i]} is split across shards (also in {a}); "
            f"MEDS keeps each subject in exactly one shard ({len(dup)} such subject(s))"
        )


def read_splits(path: Path, subject_ids: np.ndarray) -> pl.DataFrame:
    """Read `subject_splits.parquet`, keep the subjects present in the data, and check all are assigned."""
    _validate_schema(path, _read_schema(path), meds.SubjectSplitSchema, align=True)
    splits = pl.read_parquet(path, columns=["subject_id", "split"])
    if splits["subject_id"].null_count() or splits["split"].null_count():
        raise MedsError(f"{path}: null subject_id or split values")
    dup = splits.filter(pl.col("subject_id").is_duplicated())
    if len(dup):
        raise MedsError(f"{path}: subject {dup['subject_id'][0]} has more than one split row")
    present = splits.filter(pl.col("subject_id").is_in(pl.Series(subject_ids).implode()))
    missing = np.setdiff1d(subject_ids, present["subject_id"].to_numpy())
    if len(missing):
        raise MedsError(
            f"{path}: {len(missing)} subject(s) in data/ have no split (e.g. {missing[:5].tolist()})"
        )
    return present.sort("subject_id")


def make_splits(subject_ids: np.ndarray, seed: int = 0) -> pl.DataFrame:
    """Deterministic 80/10/10 subject split: shuffle the sorted ids with `seed`, cut in order.

    The same set of subjects and seed always gives the same split, whatever the shard layout.
    """
    ids = np.sort(np.asarray(subject_ids, dtype=np.int64))
    perm = np.random.default_rng(seed).permutation(len(ids))
    n_train = round(SPLIT_FRACTIONS[0] * len(ids))
    n_tuning = round(SPLIT_FRACTIONS[1] * len(ids))
    split = np.empty(len(ids), dtype=object)
    split[perm[:n_train]] = SPLITS[0]
    split[perm[n_train : n_train + n_tuning]] = SPLITS[1]
    split[perm[n_train + n_tuning :]] = SPLITS[2]
    return pl.DataFrame({"subject_id": ids, "split": split.astype(str)})


def write_splits(splits: pl.DataFrame, path: Path) -> None:
    """Write splits in the MEDS subject-split schema (subject_id int64, split string)."""
    table = splits.select("subject_id", "split").to_arrow()
    table = table.cast(pa.schema([("subject_id", pa.int64(), False), ("split", pa.string(), False)]))
    meds.SubjectSplitSchema.validate(table)
    pq.write_table(table, path)


def write_data_shard(rows: pl.DataFrame, path: str | Path) -> Path:
    """Write rows as one MEDS data shard, cast to the MEDS schema and validated, atomically.

    `rows` needs subject_id, time (datetime or int64 µs since epoch; null = static) and code;
    numeric_value / text_value are optional; extra columns are kept as they are.
    """
    from mmehr.io import atomic_path

    if rows.schema.get("time") in (pl.Int64, pl.UInt64):
        rows = rows.with_columns(pl.col("time").cast(pl.Datetime("us")))
    table = rows.to_arrow()
    types = {"subject_id": pa.int64(), "time": pa.timestamp("us"), "code": pa.string()}
    types |= {"numeric_value": pa.float32(), "text_value": pa.large_string()}
    table = table.cast(pa.schema([pa.field(f.name, types.get(f.name, f.type)) for f in table.schema]))
    meds.DataSchema.validate(table.schema)
    path = Path(path)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return path


def write_metadata(
    root: str | Path, codes: list[str], dataset: dict | None = None, splits: pl.DataFrame | None = None
) -> None:
    """Write metadata/codes.parquet, metadata/dataset.json and (if given) metadata/subject_splits.parquet."""
    from mmehr.io import atomic_path, write_json

    meta = Path(root) / "metadata"
    meta.mkdir(parents=True, exist_ok=True)
    table = pa.table(
        {
            "code": pa.array(codes, pa.string()),
            "description": pa.array([None] * len(codes), pa.string()),
            "parent_codes": pa.array([None] * len(codes), pa.list_(pa.string())),
        }
    )
    with atomic_path(meta / "codes.parquet") as tmp:
        pq.write_table(table, tmp)
    write_json(meta / "dataset.json", {"meds_version": "0.4.1", **(dataset or {})})
    if splits is not None:
        with atomic_path(meta / "subject_splits.parquet") as tmp:
            write_splits(splits, tmp)


NULL_TIME = np.iinfo(np.int64).min  # stands for a null time (a static row) in int64 time arrays


@dataclass
class ShardRows:
    """One shard's rows as numpy arrays, codes as indices into the shard's code dictionary.

    Reading `code` dictionary-encoded avoids materialising one string per row (the dominant cost of
    a MEDS shard in memory); every other per-row field is a flat numeric array.
    """

    shard: Shard
    subject: np.ndarray  # (n,) int64
    time: np.ndarray  # (n,) int64 µs since epoch; NULL_TIME where null
    timed: np.ndarray  # (n,) bool, False for static rows (null time)
    code_index: np.ndarray  # (n,) int32 index into `codes`
    codes: list[str]  # the code dictionary
    numeric_value: np.ndarray  # (n,) float32, NaN where null
    extra: pa.Table  # other requested columns, as read

    def __len__(self) -> int:
        return len(self.subject)

    def rows_of(self, subject_ids: np.ndarray) -> np.ndarray:
        """bool (n,): rows whose subject is in `subject_ids` (decided once per contiguous subject run)."""
        start = np.flatnonzero(np.concatenate([[True], self.subject[1:] != self.subject[:-1]]))
        keep = np.isin(self.subject[start], subject_ids)
        return np.repeat(keep, np.diff(np.append(start, len(self.subject))))

    def categories(self, column: str) -> tuple[np.ndarray, list[str]]:
        """An extra string column as (indices (n,) int32, -1 where null; distinct values)."""
        col = self.extra.column(column)
        if not pa.types.is_dictionary(col.type):
            col = pc.dictionary_encode(col)
        return _dictionary_indices(col)


def _dictionary_indices(col: pa.ChunkedArray) -> tuple[np.ndarray, list[str]]:
    col = col.unify_dictionaries() if col.num_chunks > 1 else col
    if col.num_chunks == 0:
        return np.zeros(0, dtype=np.int32), []
    out = np.empty(len(col), dtype=np.int32)
    at = 0
    for c in col.chunks:
        idx = c.indices.to_numpy(zero_copy_only=False)  # nulls come out as float NaN when present
        out[at : at + len(c)] = (
            np.where(c.is_valid().to_numpy(zero_copy_only=False), idx, -1) if c.null_count else idx
        )
        at += len(c)
    return out, col.chunks[0].dictionary.to_pylist()


def read_shard(
    shard: Shard, columns: list[str] | None = None, categorical: list[str] | None = None
) -> ShardRows:
    """Load one shard's rows (subject_id, time, code, numeric_value, plus any requested `columns` that
    exist in the file; `categorical` ones are read dictionary-encoded) and check the row-level MEDS
    rules: no null codes, each subject's rows contiguous, times in order within a subject.
    Raises `MedsError` naming the file.
    """
    core = ("subject_id", "time", "code", "numeric_value")
    extra = [c for c in dict.fromkeys(columns or []) if c in shard.columns and c not in core]
    want = [c for c in core if c in shard.columns] + extra
    try:
        dictionary = ["code", *(c for c in categorical or [] if c in extra)]
        table = pq.read_table(shard.path, columns=want, read_dictionary=dictionary)
    except (pa.ArrowException, OSError) as e:
        raise MedsError(f"{shard.path}: not a readable parquet file ({e})") from e
    code = table.column("code")
    if code.null_count:
        raise MedsError(f"{shard.path}: {code.null_count} row(s) with a null code")
    time = pc.cast(table.column("time"), pa.int64())
    if "numeric_value" in table.column_names:
        value = pc.fill_null(table.column("numeric_value"), np.nan).to_numpy()
    else:
        value = np.full(len(table), np.nan, dtype=np.float32)
    code_index, codes = _dictionary_indices(code)
    rows = ShardRows(
        shard=shard,
        subject=table.column("subject_id").to_numpy(),
        time=pc.fill_null(time, NULL_TIME).to_numpy(),
        timed=pc.is_valid(time).to_numpy(zero_copy_only=False),
        code_index=code_index,
        codes=codes,
        numeric_value=value,
        extra=table.select(extra),
    )
    _check_order(shard, rows)
    return rows


def _check_order(shard: Shard, rows: ShardRows) -> None:
    s = rows.subject
    runs = s[np.concatenate([[True], s[1:] != s[:-1]])] if len(s) else s
    if len(np.unique(runs)) != len(runs):
        raise MedsError(f"{shard.path}: a subject's rows are not contiguous (MEDS keeps them together)")
    t, st = rows.time[rows.timed], s[rows.timed]  # static rows (null time) are outside the order
    back = np.flatnonzero((t[1:] < t[:-1]) & (st[1:] == st[:-1]))
    if len(back):
        raise MedsError(
            f"{shard.path}: times out of order within subject {st[back[0]]} "
            "(MEDS sorts each subject's rows by time)"
        )

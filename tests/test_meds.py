"""Reading and validating MEDS roots: the real MIMIC-IV demo, splits, and every bad-input case."""

from __future__ import annotations

import json
import shutil
from datetime import datetime, timedelta

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mmehr.cli import main
from mmehr.data.meds import (
    NULL_TIME,
    MedsError,
    make_splits,
    open_meds,
    read_shard,
    write_data_shard,
    write_metadata,
)
from mmehr.data.tokenize import tokenize

T0 = datetime(2150, 1, 1)


def rows(sid: int, n: int = 3, start: datetime = T0) -> pl.DataFrame:
    """A subject with a static row then `n` timed events an hour apart."""
    times = [None] + [start + timedelta(hours=i) for i in range(n)]
    codes = ["GENDER//F"] + [f"LAB//{i}//u" for i in range(n)]
    return pl.DataFrame(
        {"subject_id": [sid] * (n + 1), "time": times, "code": codes, "numeric_value": [None] + [1.0] * n},
        schema={
            "subject_id": pl.Int64,
            "time": pl.Datetime("us"),
            "code": pl.String,
            "numeric_value": pl.Float32,
        },
    )


def make_root(root, shards: list[list[int]], splits: dict[int, str] | None = None):
    for k, sids in enumerate(shards):
        write_data_shard(pl.concat([rows(s) for s in sids]), root / "data" / f"{k}.parquet")
    split_df = (
        None if splits is None else pl.DataFrame({"subject_id": list(splits), "split": list(splits.values())})
    )
    write_metadata(root, ["GENDER//F", "LAB//0//u"], {"dataset_name": "t"}, split_df)
    return root


def write_raw(path, table: pa.Table):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)


def good_table(sids=(1,)) -> pa.Table:
    return (
        pl.concat([rows(s) for s in sids])
        .to_arrow()
        .cast(
            pa.schema(
                [
                    ("subject_id", pa.int64()),
                    ("time", pa.timestamp("us")),
                    ("code", pa.string()),
                    ("numeric_value", pa.float32()),
                ]
            )
        )
    )


# ---------------------------------------------------------------------------------------------------
# the real demo


def test_demo_opens_with_its_own_splits(mimic_demo_root):
    ds = open_meds(mimic_demo_root)
    assert ds.splits_source == "dataset"
    assert ds.n_rows == 916_166
    assert sorted(s.name for s in ds.shards) == ["held_out/0", "train/0", "tuning/0"]
    assert {s: len(ds.subjects(s)) for s in ("train", "tuning", "held_out")} == {
        "train": 80,
        "tuning": 10,
        "held_out": 10,
    }
    file_splits = pl.read_parquet(mimic_demo_root / "metadata" / "subject_splits.parquet")
    assert ds.splits.sort("subject_id").equals(file_splits.sort("subject_id"))
    assert [s.name for s in ds.shards_with("train")] == ["train/0"]


def test_read_shard_keeps_rows_codes_and_times(mimic_demo_root):
    ds = open_meds(mimic_demo_root)
    shard = next(s for s in ds.shards if s.name == "tuning/0")
    got = read_shard(shard, ["race"])
    raw = pl.read_parquet(shard.path)
    assert len(got) == len(raw) == shard.n_rows
    assert np.array(got.codes)[got.code_index].tolist() == raw["code"].to_list()
    np.testing.assert_array_equal(got.subject, raw["subject_id"].to_numpy())
    assert got.timed.tolist() == raw["time"].is_not_null().to_list()
    expected = raw["time"].dt.epoch("us").fill_null(NULL_TIME).to_numpy()
    np.testing.assert_array_equal(got.time, expected)
    np.testing.assert_array_equal(np.isnan(got.numeric_value), raw["numeric_value"].is_null().to_numpy())
    idx, values = got.categories("race")
    assert [values[i] if i >= 0 else None for i in idx] == raw["race"].to_list()


# ---------------------------------------------------------------------------------------------------
# splits


def test_missing_split_file_gives_a_deterministic_seeded_80_10_10_split(tmp_path):
    one = open_meds(make_root(tmp_path / "one", [list(range(100))]))
    three = open_meds(
        make_root(tmp_path / "three", [list(range(0, 40)), list(range(40, 70)), list(range(70, 100))])
    )
    assert one.splits_source == "generated(seed=0)"
    counts = one.splits.group_by("split").len().sort("split")
    assert dict(counts.iter_rows()) == {"train": 80, "tuning": 10, "held_out": 10}
    assert one.splits.equals(three.splits)  # same subjects, same split, whatever the sharding
    other_seed = open_meds(tmp_path / "one", seed=1).splits
    assert not other_seed.equals(one.splits)
    assert make_splits(np.arange(100), 0).equals(one.splits)


def test_subjects_missing_from_the_split_file_are_an_error(tmp_path):
    root = make_root(tmp_path / "r", [[1, 2, 3]], splits={1: "train", 2: "train"})
    with pytest.raises(MedsError, match=r"subject_splits.parquet: 1 subject\(s\) in data/ have no split"):
        open_meds(root)


# ---------------------------------------------------------------------------------------------------
# bad input: each error names the file and the problem


def test_missing_required_column(tmp_path):
    root = make_root(tmp_path / "r", [[1]])
    bad = root / "data" / "0.parquet"
    write_raw(bad, good_table().drop_columns(["code"]))
    with pytest.raises(MedsError, match=r"0\.parquet: missing required column\(s\) \['code'\]"):
        open_meds(root)


@pytest.mark.parametrize(
    "column, dtype, text",
    [
        ("subject_id", pa.string(), "subject_id is string, expected int64"),
        ("numeric_value", pa.float64(), "numeric_value is double, expected float"),
        ("time", pa.timestamp("ms"), r"time is timestamp\[ms\], expected timestamp\[us\]"),
    ],
)
def test_wrong_dtypes(tmp_path, column, dtype, text):
    root = make_root(tmp_path / "r", [[1]])
    table = good_table()
    i = table.schema.get_field_index(column)
    write_raw(root / "data" / "0.parquet", table.set_column(i, column, table.column(column).cast(dtype)))
    with pytest.raises(MedsError, match=rf"0\.parquet: wrong dtype\(s\): {text}"):
        open_meds(root)


def test_large_string_codes_are_accepted(tmp_path):
    """polars writes strings as large_string: the same logical type as MEDS's string."""
    root = make_root(tmp_path / "r", [[1]])
    pl.concat([rows(1)]).write_parquet(root / "data" / "0.parquet")
    assert pq.read_schema(root / "data" / "0.parquet").field("code").type == pa.large_string()
    assert open_meds(root).n_rows == 4


def test_subject_split_across_shards(tmp_path):
    root = make_root(tmp_path / "r", [[1, 2], [2, 3]])
    with pytest.raises(
        MedsError, match=r"1\.parquet: subject 2 is split across shards \(also in .*0\.parquet\)"
    ):
        open_meds(root)


def test_times_out_of_order_within_a_subject(tmp_path):
    root = make_root(tmp_path / "r", [[1]])
    df = pl.concat([rows(1), rows(2)])
    df = df.with_columns(
        pl.when(pl.int_range(pl.len()) == 6)
        .then(T0 - timedelta(days=1))
        .otherwise(pl.col("time"))
        .alias("time")
    )
    write_data_shard(df, root / "data" / "0.parquet")
    with pytest.raises(MedsError, match=r"0\.parquet: times out of order within subject 2"):
        read_shard(open_meds(root).shards[0])


def test_subject_rows_not_contiguous(tmp_path):
    root = make_root(tmp_path / "r", [[1]])
    write_data_shard(
        pl.concat([rows(1, 1), rows(2, 1), rows(1, 1, T0 + timedelta(days=2))]), root / "data" / "0.parquet"
    )
    with pytest.raises(MedsError, match=r"0\.parquet: a subject's rows are not contiguous"):
        read_shard(open_meds(root).shards[0])


def test_null_codes(tmp_path):
    root = make_root(tmp_path / "r", [[1]])
    table = good_table()
    codes = pa.array(["GENDER//F", None, "LAB//1//u", "LAB//2//u"], pa.string())
    write_raw(root / "data" / "0.parquet", table.set_column(2, "code", codes))
    with pytest.raises(MedsError, match=r"0\.parquet: 1 row\(s\) with a null code"):
        read_shard(open_meds(root).shards[0])


def test_empty_shards_are_skipped_and_counted(tmp_path):
    root = make_root(tmp_path / "r", [[1, 2]])
    write_raw(root / "data" / "1.parquet", good_table().slice(0, 0))
    ds = open_meds(root)
    assert ds.empty_shards == ["1"]
    assert [s.name for s in ds.shards] == ["0"]


def test_all_shards_empty_is_an_error(tmp_path):
    root = make_root(tmp_path / "r", [[1]])
    write_raw(root / "data" / "0.parquet", good_table().slice(0, 0))
    with pytest.raises(MedsError, match="every shard is empty"):
        open_meds(root)


@pytest.mark.parametrize("name", ["dataset.json", "codes.parquet"])
def test_missing_metadata_file(tmp_path, name):
    root = make_root(tmp_path / "r", [[1]])
    (root / "metadata" / name).unlink()
    with pytest.raises(MedsError, match=rf"metadata/{name}: missing metadata file"):
        open_meds(root)


def test_invalid_dataset_metadata(tmp_path):
    root = make_root(tmp_path / "r", [[1]])
    (root / "metadata" / "dataset.json").write_text(json.dumps({"dataset_name": 3}))
    with pytest.raises(MedsError, match=r"dataset\.json: does not match the MEDS dataset metadata schema"):
        open_meds(root)


def test_unreadable_parquet(tmp_path):
    root = make_root(tmp_path / "r", [[1]])
    (root / "data" / "0.parquet").write_bytes(b"this is not parquet at all")
    with pytest.raises(MedsError, match=r"0\.parquet: not a readable parquet file"):
        open_meds(root)


def test_not_a_meds_root(tmp_path):
    with pytest.raises(MedsError, match="no data/ directory"):
        open_meds(tmp_path)


def test_cli_reports_bad_input_without_a_traceback(tmp_path, capsys):
    root = make_root(tmp_path / "r", [[1, 2], [2]])
    assert main(["tokenize", "--meds", str(root), "--out", str(tmp_path / "out"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "error:" in err and "1.parquet" in err and "split across shards" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_demo_copy_with_a_broken_shard_fails_cleanly(mimic_demo_root, tmp_path):
    root = tmp_path / "demo"
    shutil.copytree(mimic_demo_root, root)
    (root / "data" / "tuning" / "0.parquet").write_bytes(b"\x00" * 100)
    with pytest.raises(MedsError, match=r"tuning/0\.parquet: not a readable parquet file"):
        open_meds(root)


def test_metadata_written_by_polars_is_accepted_and_tokenizes(tmp_path):
    # polars writes codes.parquet and subject_splits.parquet with large_string and large_list<large_string>
    # columns; the meds schemas' own `align` casts them to MEDS's string and list<string>.
    root = make_root(tmp_path / "r", [[1, 2, 3, 4, 5]])
    codes = pl.DataFrame(
        {"code": ["GENDER//F", "LAB//0//u"], "description": ["sex", None], "parent_codes": [["A"], None]}
    )
    codes.write_parquet(root / "metadata" / "codes.parquet")
    splits = pl.DataFrame({"subject_id": [1, 2, 3, 4, 5], "split": ["train"] * 4 + ["held_out"]})
    splits.write_parquet(root / "metadata" / "subject_splits.parquet")
    schema = pq.read_schema(root / "metadata" / "codes.parquet")
    assert schema.field("parent_codes").type == pa.large_list(pa.large_string())
    assert open_meds(root).splits_source == "dataset"
    manifest = tokenize(root, tmp_path / "tok", min_code_count=1, progress=False)
    assert manifest["splits"]["train"]["subjects"] == 4


def test_metadata_that_cannot_be_aligned_names_the_file_and_column(tmp_path):
    root = make_root(tmp_path / "r", [[1]])
    bad = pa.table({"code": ["GENDER//F"], "parent_codes": pa.array([7], pa.int64())})
    pq.write_table(bad, root / "metadata" / "codes.parquet")
    with pytest.raises(
        MedsError, match=r"codes\.parquet: wrong dtype\(s\): parent_codes is int64, expected list"
    ):
        open_meds(root)

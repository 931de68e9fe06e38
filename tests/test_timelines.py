"""`mmehr tokenize` end to end and `TimelineStore`: real facts of the MIMIC-IV demo, a dataset in the
current ETL code style, vocab reuse, the store's reader contract, and interrupted runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from mmehr.cli import main
from mmehr.data.meds import write_data_shard, write_metadata
from mmehr.data.timelines import TimelineStore
from mmehr.data.tokenize import tokenize
from mmehr.data.tokenizer import INTERVAL_BINS, LONG_GAP_US, UNK, Normalizer, Tokenizer, load_preset
from mmehr.io import read_manifest

SPLITS = ("train", "tuning", "held_out")


@pytest.fixture(scope="session")
def demo_out(mimic_demo_root, tmp_path_factory) -> Path:
    """The MIMIC-IV demo tokenized once per session with the default options."""
    out = tmp_path_factory.mktemp("demo") / "tok"
    tokenize(mimic_demo_root, out, preset="mimic_iv_legacy", progress=False)
    return out


@pytest.fixture(scope="session")
def demo_rows(mimic_demo_root) -> pl.DataFrame:
    return pl.read_parquet(
        mimic_demo_root / "data" / "**" / "*.parquet", columns=["subject_id", "time", "code"]
    )


def all_tokens(out: Path) -> dict[int, tuple[list[str], np.ndarray]]:
    """subject_id -> (token strings, times) over every split."""
    result = {}
    for split in SPLITS:
        store = TimelineStore(out, split)
        for i, sid in enumerate(store.subject_ids):
            tokens, times = store.timeline(i)
            result[int(sid)] = (store.vocab.decode(tokens), np.asarray(times))
    return result


# ---------------------------------------------------------------------------------------------------
# real facts of the MIMIC-IV demo


def test_demo_split_sizes_match_the_split_file(demo_out, mimic_demo_root):
    file_splits = pl.read_parquet(mimic_demo_root / "metadata" / "subject_splits.parquet")
    for split in SPLITS:
        store = TimelineStore(demo_out, split)
        expected = file_splits.filter(pl.col("split") == split)["subject_id"].sort().to_numpy()
        np.testing.assert_array_equal(np.sort(store.subject_ids), expected)
    manifest = read_manifest(demo_out)
    assert {s: manifest["splits"][s]["subjects"] for s in SPLITS} == {
        "train": 80,
        "tuning": 10,
        "held_out": 10,
    }
    assert manifest["rows"] == 916_166 and manifest["preset"] == "mimic_iv_legacy"
    assert (
        pl.read_parquet(demo_out / "subject_splits.parquet")
        .sort("subject_id")
        .equals(file_splits.sort("subject_id"))
    )


def test_demo_every_icu_admission_precedes_its_discharge(demo_out, demo_rows):
    stays = 0
    for tokens, _ in all_tokens(demo_out).values():
        icu = [t for t in tokens if t in ("ICU_ADMISSION", "ICU_DISCHARGE")]
        assert icu == ["ICU_ADMISSION", "ICU_DISCHARGE"] * (len(icu) // 2)  # strictly alternating, in order
        stays += len(icu) // 2
    assert stays == demo_rows["code"].str.starts_with("ICU_ADMISSION//").sum() == 140


def test_demo_31_deaths_appear_as_death_tokens_before_same_time_discharges(demo_out, demo_rows):
    dead = set(demo_rows.filter(pl.col("code") == "MEDS_DEATH")["subject_id"])
    assert len(dead) == 31
    tokenized = all_tokens(demo_out)
    with_death = {sid for sid, (tokens, _) in tokenized.items() if "MEDS_DEATH" in tokens}
    assert with_death == dead
    same_time = 0
    for sid in dead:
        tokens, times = tokenized[sid]
        assert tokens.count("MEDS_DEATH") == 1
        d = tokens.index("MEDS_DEATH")
        earlier_discharges = [
            i for i, t in enumerate(tokens[:d]) if t == "HOSPITAL_DISCHARGE" and times[i] == times[d]
        ]
        assert not earlier_discharges
        same_time += any(t == "HOSPITAL_DISCHARGE" and times[i] == times[d] for i, t in enumerate(tokens))
    assert same_time == 11  # in the source, these 11 discharges come before the death row


def test_demo_decoding_tokens_gives_back_the_source_codes(demo_out, demo_rows):
    """Per subject, decoded codes equal the source's timed codes in order, as the preset normalises
    them (MEDS_BIRTH and GENDER leave the timeline; death moves before a same-time discharge); a part
    rarer than the minimum count on train reads <UNK>."""
    tok = Tokenizer.load(demo_out)
    norm = Normalizer(load_preset("mimic_iv_legacy"))
    store = TimelineStore(demo_out, "train")

    def expected_code(code: str) -> str:
        tokens = norm.normalize(code).tokens
        head = tokens[0] if tokens[0] in store.vocab.stoi else UNK
        parts = [t.split("//", 1)[1] if t in store.vocab.stoi else "<UNK>" for t in tokens[1:]]
        return "//".join([head, *parts])

    source = demo_rows.filter(pl.col("time").is_not_null())
    ranks = {c: norm.normalize(c).rank for c in source["code"].unique()}
    source = source.with_columns(rank=pl.col("code").replace_strict(ranks, return_dtype=pl.Int64))
    checked = exact = 0
    for i, sid in enumerate(store.subject_ids):
        sub = source.filter((pl.col("subject_id") == sid) & (pl.col("code") != "MEDS_BIRTH"))
        sub = sub.sort(["time", "rank"], maintain_order=True)
        tokens, _ = store.timeline(i)
        decoded = tok.decode_codes(tokens)
        assert decoded == [expected_code(c) for c in sub["code"]]
        checked += len(decoded)
        exact += sum(d == c for d, c in zip(decoded, sub["code"]))
    assert (
        checked
        == source.filter(
            pl.col("subject_id").is_in(store.subject_ids.tolist()) & (pl.col("code") != "MEDS_BIRTH")
        ).height
    )
    assert exact / checked > 0.97  # most codes are frequent enough to keep every part


def test_demo_times_and_interval_tokens_agree(demo_out):
    store = TimelineStore(demo_out, "train")
    vocab = store.vocab
    interval = np.zeros(len(vocab), dtype=bool)
    interval[vocab.interval_ids] = True
    lower = dict(zip(vocab.interval_ids.tolist(), [lo for _, lo in INTERVAL_BINS]))
    for i in range(len(store)):
        tokens, times = store.timeline(i)
        tokens = np.asarray(tokens)
        assert np.all(np.diff(times) >= 0)
        assert tokens[-1] == vocab.timeline_end_id and (tokens == vocab.timeline_end_id).sum() == 1
        # between consecutive events, the interval tokens stand for the gap
        is_int = interval[tokens]
        event_pos = np.nonzero(~is_int)[0]
        new_time = np.nonzero(np.diff(times[event_pos]) > 0)[0]
        for k in new_time[:50]:
            a, b = event_pos[k], event_pos[k + 1]
            gap = times[b] - times[a]
            between = tokens[a + 1 : b]
            if gap < 5 * 60e6:
                assert len(between) == 0
                continue
            if gap >= LONG_GAP_US:  # ETHOS: round(gap / 6 months) six-month tokens, nothing else
                assert between.tolist() == [vocab.interval_ids[-1]] * round(gap / LONG_GAP_US)
            else:
                assert len(between) == 1 and lower[int(between[0])] <= gap


def test_demo_static_context_as_of_a_time(demo_out, mimic_demo_root):
    store = TimelineStore(demo_out, "train")
    raw = pl.read_parquet(mimic_demo_root / "data" / "train" / "0.parquet")
    assert store.static_len == 5  # gender, race, marital status, age decade, age year
    for i in (0, 7, 42):
        sid = int(store.subject_ids[i])
        sub = raw.filter(pl.col("subject_id") == sid)
        _, times = store.timeline(i)
        at = int(times[0])
        ctx = store.vocab.decode(store.static_context(i, at))
        gender = sub.filter(pl.col("code").str.starts_with("GENDER//"))["code"][0]
        birth = sub.filter(pl.col("code") == "MEDS_BIRTH")["time"][0]
        age = int((datetime(1970, 1, 1) + timedelta(microseconds=at) - birth).days / 365.25)
        assert ctx[0] == (gender if gender in store.vocab.stoi else "GENDER//<UNK>")
        assert ctx[3:] == [f"AGE_DECADE//{age // 10}", f"AGE_YEAR//{age % 10}"]
        at_dt = datetime(1970, 1, 1) + timedelta(microseconds=at)
        races = sub.filter(pl.col("race").is_not_null() & (pl.col("time") <= at_dt))["race"]
        # the latest race recorded by then (<UNK> if rarer than min_count), never a later one
        assert ctx[1] in {"RACE//<UNK>"} | ({f"RACE//{races[-1]}"} if races.len() else set())
        assert store.birth_us(i) == int((birth - datetime(1970, 1, 1)) / timedelta(microseconds=1))


def test_demo_store_reads_by_view_and_checks_bounds(demo_out):
    store = TimelineStore(demo_out, "train")
    assert len(store) == 80 and store.n_tokens == read_manifest(demo_out)["splits"]["train"]["tokens"]
    assert store.vocab.dtype == np.uint16
    tokens, times = store.timeline(3)
    assert tokens.dtype == np.uint16 and times.dtype == np.int64
    assert isinstance(tokens.base, np.memmap) or isinstance(tokens, np.memmap)
    w_tok, w_times = store.window(3, 10, 20)
    np.testing.assert_array_equal(w_tok, tokens[10:20])
    assert np.shares_memory(w_tok, tokens) and np.shares_memory(w_times, times)
    assert len(store.window(3, 5, 5)[0]) == 0
    with pytest.raises(IndexError):
        store.window(3, 10, len(tokens) + 1)
    with pytest.raises(IndexError):
        store.timeline(80)
    assert store.index_of(int(store.subject_ids[5])) == 5
    with pytest.raises(KeyError, match="not in split"):
        store.index_of(-1)
    with pytest.raises(ValueError, match="no split 'nope'"):
        TimelineStore(demo_out, "nope")


# ---------------------------------------------------------------------------------------------------
# small datasets written here

T0 = datetime(2150, 3, 1, 8)
SCHEMA = {
    "subject_id": pl.Int64,
    "time": pl.Datetime("us"),
    "code": pl.String,
    "numeric_value": pl.Float32,
    "race": pl.String,
    "marital_status": pl.String,
}


def write_dataset(root: Path, rows: list[tuple], splits: dict[int, str] | None, shards=None) -> Path:
    df = pl.DataFrame(rows, schema=SCHEMA, orient="row")
    for k, sids in enumerate(shards or [sorted(set(df["subject_id"]))]):
        write_data_shard(df.filter(pl.col("subject_id").is_in(sids)), root / "data" / f"{k}.parquet")
    split_df = (
        None if splits is None else pl.DataFrame({"subject_id": list(splits), "split": list(splits.values())})
    )
    write_metadata(root, sorted(set(df["code"])), {"dataset_name": "tiny"}, split_df)
    return root


def h(hours: float) -> datetime:
    return T0 + timedelta(hours=hours)


def current_etl_rows(sid: int, shift: float = 0) -> list[tuple]:
    """One stay in the current mimic-iv-meds code style."""
    return [
        (sid, None, "GENDER//M", None, None, None),
        (sid, datetime(2090, 1, 1), "MEDS_BIRTH", None, None, None),
        (sid, h(shift), "ED_REGISTRATION", None, None, None),
        (sid, h(shift + 1), "HOSPITAL_ADMISSION//EW EMER.//EMERGENCY ROOM", None, "WHITE", "SINGLE"),
        (sid, h(shift + 2), "LAB//SPECIMEN_COLLECTED//50912//mg/dL", None, None, None),
        (sid, h(shift + 3), "LAB//RESULT//50912//mg/dL", 1.0 + sid % 7, None, None),
        (sid, h(shift + 4), "ICU_ADMISSION//Medical Intensive Care Unit (MICU)", None, None, None),
        (sid, h(shift + 30), "ICU_DISCHARGE//Medical Intensive Care Unit (MICU)", None, None, None),
        (sid, h(shift + 50), "DIAGNOSIS//ICD//10//I10", None, None, None),
        (sid, h(shift + 50), "HOSPITAL_DISCHARGE//HOME", None, None, None),
    ]


def test_a_dataset_in_the_current_etl_code_style_tokenizes(tmp_path):
    splits = {sid: ("train" if sid < 16 else "held_out") for sid in range(20)}
    rows = [r for sid in range(20) for r in current_etl_rows(sid, shift=sid)]
    root = write_dataset(tmp_path / "meds", rows, splits)
    manifest = tokenize(root, tmp_path / "tok", progress=False)
    assert manifest["preset"] == "mimic_iv"  # detected from LAB//RESULT// codes
    store = TimelineStore(tmp_path / "tok", "train")
    tokens = store.vocab.decode(store.timeline(0)[0])
    assert tokens[:2] == ["ED_REGISTRATION", "INTERVAL//45m-1h15m"]
    assert tokens[2:5] == [
        "HOSPITAL_ADMISSION",
        "ADMISSION_TYPE//EW EMER.",
        "ADMISSION_LOCATION//EMERGENCY ROOM",
    ]
    lab = tokens.index("LAB//50912//mg/dL")  # mapped to the older generation's lab token
    assert tokens[lab + 1].startswith("Q")
    assert not any("SPECIMEN_COLLECTED" in t for t in tokens)
    assert tokens[-4:] == [
        "DIAGNOSIS//ICD//10//I10",
        "HOSPITAL_DISCHARGE",
        "DISCHARGE_LOCATION//HOME",
        "TIMELINE_END",
    ]
    assert tokens.index("ICU_ADMISSION") < tokens.index("ICU_DISCHARGE")
    assert store.vocab.decode(store.static_context(0, int(store.timeline(0)[1][0]))) == [
        "GENDER//M",
        "RACE//<UNK>",  # recorded at the admission, after this time: not known yet
        "MARITAL_STATUS//<UNK>",
        "AGE_DECADE//6",
        "AGE_YEAR//0",
    ]


def test_static_context_takes_the_most_recent_value(tmp_path):
    rows = [
        (1, None, "GENDER//F", None, None, None),
        (1, h(0), "HOSPITAL_ADMISSION//A//B", None, "WHITE", "SINGLE"),
        (1, h(10), "HOSPITAL_DISCHARGE//HOME", None, None, None),
        (1, h(1000), "HOSPITAL_ADMISSION//A//B", None, "WHITE", "MARRIED"),
    ]
    root = write_dataset(tmp_path / "meds", rows, {1: "train"})
    tokenize(root, tmp_path / "tok", min_code_count=1, progress=False)
    store = TimelineStore(tmp_path / "tok", "train")

    def marital(hours):
        return store.vocab.decode(store.static_context(0, _us(h(hours))))[2]

    assert marital(-5) == "MARITAL_STATUS//<UNK>"  # nothing yet: unknown, never a later value
    assert marital(500) == "MARITAL_STATUS//SINGLE"
    assert marital(1000) == "MARITAL_STATUS//MARRIED"
    assert store.vocab.decode(store.static_context(0, _us(h(0))))[3:] == [
        "AGE_DECADE//<UNK>",
        "AGE_YEAR//<UNK>",
    ]
    assert store.birth_us(0) is None


def _us(dt: datetime) -> int:
    return int((dt - datetime(1970, 1, 1)) / timedelta(microseconds=1))


def test_vocab_from_reuses_the_fitted_tokenizer_without_refitting(tmp_path):
    a = write_dataset(
        tmp_path / "a", [r for s in range(10) for r in current_etl_rows(s)], {s: "train" for s in range(10)}
    )
    tokenize(a, tmp_path / "tok_a", progress=False)
    rows_b = [r for s in range(100, 103) for r in current_etl_rows(s)]
    rows_b.append((102, h(60), "LAB//RESULT//11111//g", 3.0, None, None))  # unseen when fitting on a
    b = write_dataset(tmp_path / "b", rows_b, {100: "train", 101: "train", 102: "held_out"})
    manifest = tokenize(b, tmp_path / "tok_b", vocab_from=tmp_path / "tok_a", progress=False)
    for name in ("vocab.json", "stats.json", "tokenizer.yaml"):
        assert (tmp_path / "tok_a" / name).read_bytes() == (tmp_path / "tok_b" / name).read_bytes()
    assert manifest["vocab_from"] == str((tmp_path / "tok_a").resolve())
    store = TimelineStore(tmp_path / "tok_b", "held_out")
    tokens = store.vocab.decode(store.timeline(0)[0])
    assert tokens[tokens.index("TIMELINE_END") - 1] == UNK
    with pytest.raises(ValueError, match="--preset cannot be combined with --vocab-from"):
        tokenize(b, tmp_path / "tok_c", vocab_from=tmp_path / "tok_a", preset="generic", progress=False)


def test_vocab_from_an_incomplete_output_is_refused(tmp_path):
    a = write_dataset(tmp_path / "a", current_etl_rows(1), {1: "train"})
    (tmp_path / "half").mkdir()
    with pytest.raises(FileNotFoundError, match=r"manifest\.json"):
        tokenize(a, tmp_path / "tok", vocab_from=tmp_path / "half", progress=False)


def test_generated_splits_are_saved_with_the_output(tmp_path):
    root = write_dataset(tmp_path / "meds", [r for s in range(30) for r in current_etl_rows(s)], splits=None)
    manifest = tokenize(root, tmp_path / "tok", seed=3, progress=False)
    assert manifest["splits_source"] == "generated(seed=3)"
    saved = pl.read_parquet(tmp_path / "tok" / "subject_splits.parquet")
    assert dict(saved.group_by("split").len().iter_rows()) == {"train": 24, "tuning": 3, "held_out": 3}
    assert sum(manifest["splits"][s]["subjects"] for s in SPLITS) == 30
    assert not (root / "metadata" / "subject_splits.parquet").exists()  # the input is never written to


def test_mixed_split_shards_are_written_per_split_and_shard(tmp_path):
    splits = {s: SPLITS[s % 3] for s in range(12)}
    rows = [r for s in range(12) for r in current_etl_rows(s)]
    root = write_dataset(tmp_path / "meds", rows, splits, shards=[list(range(6)), list(range(6, 12))])
    manifest = tokenize(root, tmp_path / "tok", min_code_count=1, progress=False)
    for split in SPLITS:
        assert manifest["splits"][split]["shards"] == ["shard-0", "shard-1"]
        store = TimelineStore(tmp_path / "tok", split)
        assert sorted(store.subject_ids.tolist()) == [s for s in range(12) if splits[s] == split]
        assert len(store.static_context(len(store) - 1, _us(h(5)))) == 5


def test_large_vocabularies_store_int32_tokens(tmp_path):
    n = 66_000
    rows = [(1, None, "GENDER//F", None, None, None)]
    rows += [(1, T0 + timedelta(seconds=i), f"C//{i}", None, None, None) for i in range(n)]
    root = write_dataset(tmp_path / "meds", rows, {1: "train"})
    tokenize(root, tmp_path / "tok", preset="generic", min_code_count=1, progress=False)
    store = TimelineStore(tmp_path / "tok", "train")
    assert len(store.vocab) > 65_536 and store.vocab.dtype == np.int32
    tokens, _ = store.timeline(0)
    assert tokens.dtype == np.int32 and store.vocab.decode(tokens[-2:]) == [f"C//{n - 1}", "TIMELINE_END"]


def test_empty_shard_is_skipped_and_counted_in_the_manifest(tmp_path):
    root = write_dataset(tmp_path / "meds", current_etl_rows(1), {1: "train"})
    write_data_shard(pl.DataFrame(schema=SCHEMA), root / "data" / "empty.parquet")
    manifest = tokenize(root, tmp_path / "tok", progress=False)
    assert manifest["skipped"]["empty_shards"] == ["empty"]


def test_cli_prints_a_summary_and_where_it_wrote(tmp_path, capsys):
    root = write_dataset(
        tmp_path / "meds", [r for s in range(5) for r in current_etl_rows(s)], {s: "train" for s in range(5)}
    )
    assert main(["tokenize", "--meds", str(root), "--out", str(tmp_path / "tok"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "events/s" in out and "vocab" in out and f"wrote {(tmp_path / 'tok').resolve()}" in out
    assert json.loads((tmp_path / "tok" / "manifest.json").read_text())["stage"] == "tokenize"


# ---------------------------------------------------------------------------------------------------
# interrupted runs never leave a trusted output


def test_a_failure_midway_leaves_no_output_and_keeps_the_previous_one(tmp_path):
    rows = [r for s in range(6) for r in current_etl_rows(s)]
    splits = {s: "train" if s < 3 else "held_out" for s in range(6)}
    root = write_dataset(tmp_path / "meds", rows, splits, shards=[[0, 1, 2], [3, 4, 5]])
    out = tmp_path / "tok"
    tokenize(root, out, progress=False)
    before = (out / "manifest.json").read_bytes()
    # the held-out shard now has a time out of order: found only after the train shard is written
    bad = pl.read_parquet(root / "data" / "1.parquet")
    bad = bad.with_columns(
        pl.when(pl.int_range(pl.len()) == 5)
        .then(datetime(2000, 1, 1))
        .otherwise(pl.col("time"))
        .alias("time")
    )
    write_data_shard(bad, root / "data" / "1.parquet")
    with pytest.raises(ValueError, match="out of order"):
        tokenize(root, out, progress=False)
    assert (out / "manifest.json").read_bytes() == before  # the earlier complete output is untouched
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tok")] == []  # no leftovers
    fresh = tmp_path / "fresh"
    with pytest.raises(ValueError):
        tokenize(root, fresh, progress=False)
    assert not fresh.exists()


def test_a_killed_tokenize_leaves_nothing_a_later_step_trusts(mimic_demo_root, tmp_path):
    out = tmp_path / "tok"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mmehr.cli",
            "tokenize",
            "--meds",
            str(mimic_demo_root),
            "--out",
            str(out),
            "--no-progress",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        partial = list(tmp_path.glob(".tok.tmp-*/*/shard-*"))
        if partial:  # some shards written, the run not finished
            break
        time.sleep(0.005)
    if proc.poll() is not None:
        pytest.fail("tokenize finished before it could be interrupted")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists()
    with pytest.raises(FileNotFoundError, match="did not finish"):
        TimelineStore(out, "train")


def test_mimic_iv_gets_the_ethos_preset_unless_asked_otherwise(mimic_demo_root, tmp_path):
    # The paper tokenizes MIMIC-IV as ETHOS: a dataset named MIMIC-IV gets the `ethos` preset by default.
    manifest = tokenize(mimic_demo_root, tmp_path / "tok", progress=False)
    assert manifest["preset"] == "ethos" and manifest["min_code_count"] == 1
    legacy = tokenize(mimic_demo_root, tmp_path / "legacy", preset="mimic_iv_legacy", progress=False)
    assert legacy["preset"] == "mimic_iv_legacy" and legacy["min_code_count"] == 10

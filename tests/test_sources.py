"""Readers of the MIMIC modality formats: round trips of what the generator wrote, skipped records,
bad CSV columns, and the payloads handed to encoders."""

from __future__ import annotations

import gzip
import io
import shutil
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import wfdb
from PIL import Image

from mmehr.cli import main
from mmehr.data.synthetic import SynthConfig, generate
from mmehr.io import read_manifest
from mmehr.modalities.sources import (
    CANONICAL_LEADS,
    build_index,
    load_payload,
    read_wfdb_header,
    study_time_us,
)

SEC = 1_000_000


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("src") / "synth", SynthConfig(subjects=12, seed=4))


@pytest.fixture
def copy_of(synth, tmp_path):
    """A writable copy of one modality root of the synthetic cohort."""

    def make(source: str) -> Path:
        return Path(shutil.copytree(synth / source, tmp_path / source))

    return make


def _events(out: Path) -> pl.DataFrame:
    return pl.read_parquet(out / "events.parquet")


def _skipped(out: Path) -> pl.DataFrame:
    return pl.read_parquet(out / "skipped.parquet")


def _us(text: str, fmt: str = "%Y-%m-%d %H:%M:%S") -> int:
    return int((datetime.strptime(text, fmt) - datetime(1970, 1, 1)).total_seconds()) * SEC


# ----------------------------------------------------------------------------------------------------
# ECG


def test_ecg_round_trip_times_counts_and_canonical_lead_order(synth, tmp_path):
    out = build_index("ecg", synth / "ecg", tmp_path / "idx")
    records = pl.read_csv(synth / "ecg" / "record_list.csv")
    events = _events(out)
    assert events.height == records.height and _skipped(out).height == 0
    assert events.columns[:5] == ["subject_id", "time", "modality", "event_id", "payload"]
    by_id = dict(zip(events["event_id"], events.iter_rows(named=True)))
    for rec in records.iter_rows(named=True):
        ev = by_id[f"ecg-{rec['study_id']}"]
        assert ev["subject_id"] == rec["subject_id"] and ev["time"] == _us(rec["ecg_time"])
        assert (ev["fs"], ev["n_samples"]) == (500.0, 5000)
    ev = events.row(0, named=True)
    ecg, fs = load_payload(out, ev)
    assert ecg.shape == (12, 5000) and ecg.dtype == np.float32 and fs == 500.0
    native, fields = wfdb.rdsamp(str(synth / "ecg" / ev["payload"]))
    assert fields["sig_name"][4:6] == ["aVF", "aVL"]  # MIMIC's native order swaps them
    for k, lead in enumerate(CANONICAL_LEADS):
        np.testing.assert_allclose(ecg[k], native[:, fields["sig_name"].index(lead)], atol=1e-6)
    # Canonical aVL / aVF obey Goldberger's relations, so the swap really was undone.
    assert np.abs(ecg[4] - (ecg[0] - ecg[1] / 2)).max() < 0.0051
    assert np.abs(ecg[5] - (ecg[1] - ecg[0] / 2)).max() < 0.0051
    manifest = read_manifest(out)
    assert (
        manifest["root"] == str((synth / "ecg").resolve()) and manifest["counts"]["events"] == events.height
    )


def test_ecg_leads_are_reordered_by_the_header_names(tmp_path):
    root = tmp_path / "ecg"
    rel = "files/p1000/p10000001/s1/1"
    (root / rel).parent.mkdir(parents=True)
    shuffled = ["V6", "AVF", "I", "V1", "III", "avl", "V2", "II", "V3", "aVR", "V4", "V5"]
    signal = np.tile(np.arange(12, dtype=float), (300, 1))  # column j is the constant j (mV)
    wfdb.wrsamp("1", fs=250, units=["mV"] * 12, sig_name=shuffled, p_signal=signal, fmt=["16"] * 12,
                adc_gain=[200] * 12, baseline=[0] * 12, write_dir=str((root / rel).parent))  # fmt: skip
    (root / "record_list.csv").write_text(
        f"subject_id,study_id,file_name,ecg_time,path\n10000001,1,1,2180-07-23 08:44:00,{rel}\n"
    )
    out = build_index("ecg", root, tmp_path / "idx")
    ecg, fs = load_payload(out, _events(out).row(0, named=True))
    upper = [n.upper() for n in shuffled]
    assert ecg[:, 0].tolist() == [float(upper.index(lead.upper())) for lead in CANONICAL_LEADS]
    assert fs == 250.0 and ecg.shape == (12, 300)


def test_ecg_missing_or_corrupt_records_are_skipped_and_counted(copy_of, tmp_path):
    root = copy_of("ecg")
    paths = pl.read_csv(root / "record_list.csv")["path"].to_list()
    (root / f"{paths[0]}.dat").unlink()  # missing samples
    (root / f"{paths[1]}.hea").unlink()  # missing header
    (root / f"{paths[2]}.hea").write_text("garbage\x00 not a header\n")  # corrupt header
    dat = root / f"{paths[3]}.dat"
    dat.write_bytes(dat.read_bytes()[:1000])  # truncated samples
    hea = root / f"{paths[4]}.hea"
    hea.write_text(hea.read_text().replace(" V6\n", " V7\n"))  # a lead is missing
    out = build_index("ecg", root, tmp_path / "idx")
    skipped = _skipped(out)
    assert dict(zip(skipped["record"], skipped["reason"])) == {
        paths[0]: "missing data file",
        paths[1]: "missing header",
        paths[2]: "corrupt header",
        paths[3]: "truncated data file",
        paths[4]: "missing leads",
    }
    assert _events(out).height == len(paths) - 5
    counts = read_manifest(out)["counts"]
    assert counts["skipped"] == 5 and counts["records"] == len(paths)
    assert counts["skipped_by_reason"]["missing header"] == 1


def test_the_fast_header_parser_agrees_with_wfdb(synth):
    rel = pl.read_csv(synth / "ecg" / "record_list.csv")["path"][0]
    stem = synth / "ecg" / rel
    ours, theirs = read_wfdb_header(stem), wfdb.rdheader(str(stem))
    assert (ours.fs, ours.sig_len, ours.sig_name, ours.fmt, ours.file_name) == (
        theirs.fs, theirs.sig_len, theirs.sig_name, theirs.fmt, theirs.file_name,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------------
# CXR


@pytest.mark.parametrize(
    ("date", "clock", "expected"),
    [
        ("21800506", "123456.789", "2180-05-06 12:34:56.789000"),
        ("21800506", "81413", "2180-05-06 08:14:13.000000"),
        ("21800506", "81413.5", "2180-05-06 08:14:13.500000"),
        ("21800506", "000005.000001", "2180-05-06 00:00:05.000001"),
        ("21800506", "5", "2180-05-06 00:00:05.000000"),
    ],
)
def test_study_date_and_fractional_study_time_to_microseconds(date, clock, expected):
    dt = datetime.strptime(expected, "%Y-%m-%d %H:%M:%S.%f")
    assert study_time_us(date, clock) == (dt - datetime(1970, 1, 1)) // timedelta(microseconds=1)


@pytest.mark.parametrize(
    ("date", "clock"), [("2180056", "1200"), ("21801306", "120000"), ("21800506", "12:00"), ("", "")]
)
def test_malformed_study_times_are_rejected(date, clock):
    assert study_time_us(date, clock) is None


def test_cxr_round_trip_times_views_and_pixels(synth, tmp_path):
    meta = pl.read_csv(synth / "cxr" / "mimic-cxr-2.0.0-metadata.csv", infer_schema=False)
    out = build_index("cxr", synth / "cxr", tmp_path / "all")
    events = _events(out)
    assert events.height == meta.height
    ledger = pl.read_parquet(synth / "truth_events.parquet").filter(pl.col("modality") == "cxr")
    joined = events.join(ledger.select("event_id", truth_time="time", truth_view="view"), on="event_id")
    assert joined.height == events.height
    assert (joined["time"] == joined["truth_time"]).all()  # millisecond StudyTime fractions survive
    assert (joined["view_position"] == joined["truth_view"]).all()
    row = events.row(0, named=True)
    img = load_payload(out, row)
    assert img.dtype == np.uint8 and img.shape == (256, 256) and (row["rows"], row["columns"]) == (256, 256)
    np.testing.assert_array_equal(img, np.asarray(Image.open(synth / "cxr" / row["payload"])))

    frontal = build_index("cxr", synth / "cxr", tmp_path / "frontal", views=["PA", "AP"])
    n_lateral = (meta["ViewPosition"] == "LATERAL").sum()
    assert n_lateral > 0 and _events(frontal).height == meta.height - n_lateral
    assert set(_events(frontal)["view_position"]) == {"PA", "AP"}
    assert read_manifest(frontal)["counts"]["skipped_by_reason"] == {"view LATERAL not selected": n_lateral}


def test_cxr_unreadable_images_are_skipped_and_counted(copy_of, tmp_path):
    root = copy_of("cxr")
    images = sorted((root / "files").rglob("*.jpg"))
    images[0].unlink()
    images[1].write_bytes(images[1].read_bytes()[:600])
    images[2].write_bytes(b"this is not a jpeg at all")
    out = build_index("cxr", root, tmp_path / "idx")
    reasons = sorted(_skipped(out)["reason"].to_list())
    assert reasons == ["missing image", "truncated image", "unreadable image"]
    assert _events(out).height == len(images) - 3


# ----------------------------------------------------------------------------------------------------
# Notes


def _read_gz_csv(path: Path) -> pl.DataFrame:
    with gzip.open(path) as f:
        return pl.read_csv(io.BytesIO(f.read()), infer_schema=False)


def test_notes_round_trip_text_times_and_types(synth, tmp_path):
    out = build_index("note", synth / "note", tmp_path / "idx")
    events = _events(out)
    source = pl.concat([_read_gz_csv(synth / "note" / f"{n}.csv.gz") for n in ("discharge", "radiology")])
    assert events.height == source.height and set(events["note_type"]) == {"DS", "RR"}
    joined = events.join(source.rename({"text": "src_text"}), left_on="payload", right_on="note_id")
    assert (joined["text"] == joined["src_text"]).all()
    chart = joined["charttime"].map_elements(_us, return_dtype=pl.Int64)
    store = joined["storetime"].map_elements(_us, return_dtype=pl.Int64)
    radiology = (joined["note_type"] == "RR").to_numpy()
    # Radiology notes at their charttime; discharge summaries never before they were stored.
    assert (joined["time"].to_numpy()[radiology] == chart.to_numpy()[radiology]).all()
    expected_ds = np.maximum(chart.to_numpy(), store.to_numpy())[~radiology]
    assert (joined["time"].to_numpy()[~radiology] == expected_ds).all()
    assert events["hadm_id"].null_count() == 0
    row = events.filter(pl.col("note_type") == "DS").row(0, named=True)
    assert load_payload(out, row) == row["text"]
    assert load_payload(out, {"modality": "note", "payload": row["payload"]}) == row["text"]  # by reference


def test_discharge_summary_with_a_date_only_charttime_is_not_placed_before_the_discharge(tmp_path):
    # MIMIC-IV-Note discharge summaries carry midnight of the discharge day as charttime.
    root = tmp_path / "note"
    root.mkdir()
    pl.DataFrame(
        {
            "note_id": ["1-DS-1", "1-DS-2", "1-DS-3"],
            "subject_id": ["1", "1", "1"],
            "hadm_id": ["5", "6", "7"],
            "note_type": ["DS"] * 3,
            "note_seq": ["1", "2", "3"],
            "charttime": ["2180-01-03 00:00:00", "2180-02-03 00:00:00", "2180-03-03 14:30:00"],
            "storetime": ["2180-01-03 16:12:00", "", ""],
            "text": ["a", "b", "c"],
        }
    ).write_csv(root / "discharge.csv")
    events = _events(build_index("note", root, tmp_path / "idx"))
    times = dict(zip(events["payload"], events["time"]))
    assert times["1-DS-1"] == _us("2180-01-03 16:12:00")  # its storetime
    assert times["1-DS-2"] == _us("2180-02-04 00:00:00") - 1  # the end of its day
    assert times["1-DS-3"] == _us("2180-03-03 14:30:00")  # a real time is kept


def test_empty_notes_are_skipped_and_note_text_is_never_printed(tmp_path, capsys):
    root = tmp_path / "note"
    root.mkdir()
    secret = "Patient confided the secret word xylophone-42."
    df = pl.DataFrame(
        {
            "note_id": ["1-RR-1", "1-RR-2", "1-RR-3", "2-RR-1"],
            "subject_id": ["1", "1", "1", "oops"],
            "hadm_id": ["", "", "5", ""],
            "note_type": ["RR"] * 4,
            "note_seq": ["1", "2", "3", "1"],
            "charttime": ["2180-01-01 10:00:00", "2180-01-01 11:00:00", "not a time", "2180-01-01 10:00:00"],
            "storetime": [""] * 4,
            "text": [secret, "   ", "x", "y"],
        }
    )
    df.write_csv(root / "radiology.csv")
    out = build_index("note", root, tmp_path / "idx")
    captured = capsys.readouterr()
    assert "xylophone" not in captured.out + captured.err
    assert _events(out)["text"].to_list() == [secret]
    assert _events(out)["hadm_id"].to_list() == [None]  # radiology notes may lack an admission
    assert dict(zip(_skipped(out)["record"], _skipped(out)["reason"])) == {
        "1-RR-2": "empty text",
        "1-RR-3": "bad charttime",
        "2-RR-1": "bad subject_id",
    }


# ----------------------------------------------------------------------------------------------------
# Bad inputs


@pytest.mark.parametrize(
    ("source", "file", "drop"),
    [
        ("ecg", "record_list.csv", "path"),
        ("cxr", "mimic-cxr-2.0.0-metadata.csv", "StudyTime"),
        ("note", "radiology.csv", "charttime"),
    ],
)
def test_bad_csv_columns_give_a_clear_error_naming_file_and_columns(tmp_path, capsys, source, file, drop):
    root = tmp_path / source
    root.mkdir()
    cols = {
        "ecg": ["subject_id", "study_id", "file_name", "ecg_time", "path"],
        "cxr": ["dicom_id", "subject_id", "study_id", "ViewPosition", "StudyDate", "StudyTime"],
        "note": ["note_id", "subject_id", "hadm_id", "note_type", "charttime", "text"],
    }[source]
    (root / file).write_text(",".join(c for c in cols if c != drop) + "\n")
    with pytest.raises(ValueError, match=rf"{file}.*missing required column.*{drop}"):
        build_index(source, root, tmp_path / "idx")
    assert main(["index", "--source", source, "--root", str(root), "--out", str(tmp_path / "idx")]) == 1
    err = capsys.readouterr().err
    assert file in err and drop in err
    assert not (tmp_path / "idx").exists()


def test_a_root_without_its_index_file_is_a_clear_error(tmp_path):
    for source, expected in [
        ("ecg", "record_list.csv"),
        ("cxr", "mimic-cxr-2.0.0-metadata.csv"),
        ("note", "discharge"),
    ]:
        with pytest.raises(FileNotFoundError, match=expected):
            build_index(source, tmp_path, tmp_path.with_name(tmp_path.name + "-idx"))
    with pytest.raises(ValueError, match="--views"):
        build_index("ecg", tmp_path, tmp_path.with_name(tmp_path.name + "-idx"), views=["PA"])


def test_cli_index_writes_manifest_last_and_replaces_old_output(synth, tmp_path, capsys):
    out = tmp_path / "idx"
    assert main(["index", "--source", "cxr", "--root", str(synth / "cxr"), "--out", str(out)]) == 0
    (out / "stale.txt").write_text("from an older run")  # inside a complete index output: replaced
    args = ["index", "--source", "cxr", "--root", str(synth / "cxr"), "--out", str(out), "--views", "PA,AP"]
    assert main(args) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["events.parquet", "manifest.json", "skipped.parquet"]
    assert read_manifest(out)["views"] == ["PA", "AP"]
